"""Stage 0's pieces (see :mod:`synthface.stage0`): its training data (:func:`load_data`), the VAE and diffusion
:class:`train.loop.Task` s, host-side initialisation, the trainer wrapper and the checks run on the export."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from synthface.world import EXPRESSIONS
from train import loop, runs


# =========================================================================================================
# Data
# =========================================================================================================
@dataclasses.dataclass
class Stage0Data:
    """The training images (``uint8 [N, R, R, 3]``), token ids of each text variant (``int32 [N, 3, 77]``:
    caption, + face prompt, + grid prompt), the empty prompt's ids (``[77]``) and held-out images; with
    ``data.pairs`` the two-person images (``uint8 [M, R, 2R, 3]``) and their caption ids (``int32 [M, 77]``)."""

    images: np.ndarray
    token_ids: np.ndarray
    empty_ids: np.ndarray
    heldout: np.ndarray
    captions: list[str]
    index: dict
    pair_images: np.ndarray | None = None
    pair_token_ids: np.ndarray | None = None
    expression_labels: np.ndarray | None = None  # int32 [N]: the index of each image's expression in EXPRESSIONS


def text_variants(record: Mapping) -> tuple[str, str, str]:
    """Caption, caption + face prompt, caption + grid prompt of one SynthFace record."""
    caption = record["caption"]
    return caption, f"{caption}, {record['face_prompt']}", f"{caption}, {record['grid_prompt']}"


def _resize(images: np.ndarray, size: int, width: int | None = None) -> np.ndarray:
    width = size if width is None else width
    if images.shape[1] == size and images.shape[2] == width:
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((width, size), Image.BICUBIC)) for im in images])


def load_data(cfg: Mapping, tokenizer) -> Stage0Data:
    import synthface
    from dynamicid_jax.tokenizer import tokenize

    d = cfg["data"]
    index = synthface.load_index(d["root"])
    images, records = synthface.load_split(d["root"], "train")
    images = _resize(images, int(d["resolution"]))
    texts = [text_variants(r) for r in records]
    ids = np.asarray(tokenize(tokenizer, [t for v in texts for t in v]), np.int32).reshape(len(texts), 3, -1)
    heldout = np.zeros((0,) + images.shape[1:], np.uint8)
    n_held = int(d["heldout_images"])
    if n_held > 0 and index["splits"].get("heldout"):
        held, _ = synthface.load_split(d["root"], "heldout")
        heldout = _resize(held[:n_held], int(d["resolution"]))
    empty = np.asarray(tokenize(tokenizer, [""]), np.int32)[0]
    pair_images = pair_ids = None
    if d["pairs"]:
        pair_images, pair_records = synthface.load_pairs(d["root"])
        if not len(pair_images):
            raise ValueError(f"data.pairs=true but {d['root']!r} holds no pairs (python -m synthface "
                             "... --pairs M)")
        res = int(d["resolution"])
        pair_images = _resize(pair_images, res, 2 * res)
        pair_ids = np.asarray(tokenize(tokenizer, [r["caption"] for r in pair_records]), np.int32)
    expressions = np.asarray([EXPRESSIONS.index(r["expression"]) for r in records], np.int32)
    return Stage0Data(images, ids, empty, heldout, [t[0] for t in texts], index, pair_images, pair_ids, expressions)


# =========================================================================================================
# Phases
# =========================================================================================================
def _forever_empty():
    while True:
        yield {}


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _trainer_config(p: Mapping, cfg: Mapping) -> dict:
    """The :class:`train.loop.Trainer` sections of one phase (warm-up then cosine decay to ``final_lr_fraction``)."""
    steps = int(p["steps"])
    warmup = min(int(p["warmup_steps"]), max(steps - 1, 0))
    return {
        "train": {**loop.TRAIN_DEFAULTS, "seed": int(cfg["seed"]), "steps": steps, "ema_decay": p["ema_decay"],
                  "log_every": max(1, int(p["log_every"])), "progress_bar": bool(cfg["progress_bar"])},
        "optimizer": {**loop.OPTIMIZER_DEFAULTS, "lr": float(p["lr"]), "weight_decay": float(p["weight_decay"]),
                      "clip_grad_norm": float(p["clip_grad_norm"]), "schedule": "cosine", "warmup_steps": warmup,
                      "decay_steps": max(steps, warmup + 1), "final_lr_fraction": float(p["final_lr_fraction"])},
        "checkpoint": {**loop.CHECKPOINT_DEFAULTS, "every": int(p["checkpoint_every"]), "keep": 1, "async": True},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
    }


def _mesh(cfg: Mapping):
    from dynamicid_jax import sharding as sh

    n = int(cfg["devices"])
    devices = jax.devices() if n <= 0 else jax.devices()[:n]
    if n > len(jax.devices()):
        raise ValueError(f"devices={n} but only {len(jax.devices())} are visible")
    return sh.make_mesh(sh.MeshConfig(data=len(devices)), devices=devices)


def _boxed(module, *args):
    return runs.boxed_abstract(module, *args)


def _spec_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def _batch_constraint(x: jax.Array) -> jax.Array:
    """Split a batch drawn inside the step over the mesh's data axis (no-op on one device)."""
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(("data", "fsdp")))


class _Recorder:
    """``on_step`` callback: loss every ``every`` steps (appended to ``{folder}/losses.jsonl``) and timings."""

    def __init__(self, folder: str, every: int):
        self.path, self.every = os.path.join(folder, "losses.jsonl"), max(1, every)
        self.start = time.perf_counter()
        self.first_step_s: float | None = None
        self.steps_run = 0

    def __call__(self, step: int, state, metrics) -> None:
        self.steps_run += 1
        if self.first_step_s is None:
            jax.block_until_ready(metrics["loss"])
            self.first_step_s = time.perf_counter() - self.start  # includes compilation
        if step % self.every == 0 or self.steps_run == 1:
            values = {k: float(v) for k, v in loop.host_value(metrics).items()}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values, "t": time.perf_counter() - self.start}) + "\n")


def read_losses(folder: str) -> list[dict]:
    path = os.path.join(folder, "losses.jsonl")
    if not os.path.exists(path):
        return []
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out[rec["step"]] = rec  # a resumed run may repeat steps: keep the latest
    return [out[k] for k in sorted(out)]


def host_init(abstract: Any, seed: int) -> Any:
    """Fresh params for an abstract (boxed or not) Flax param tree, drawn on the host with the initialisers our
    layers use (``kernel``: LeCun normal, truncated at 2σ, fan-in = all but the last axis; ``bias``: 0;
    ``scale``: 1; ``embedding``: N(0, 0.02²)). XLA on a CPU needs tens of seconds to compile a model's ``init``;
    this takes milliseconds."""
    from flax import traverse_util
    from flax.core import meta

    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(meta.unbox(abstract))
    out = {}
    for path, leaf in sorted(flat.items()):
        shape, name = tuple(leaf.shape), path[-1]
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            std = np.sqrt(1.0 / max(fan_in, 1)) / 0.87962566103423978  # std of N(0,1) truncated to [-2, 2]
            x = rng.standard_normal(shape)
            bad = np.abs(x) > 2
            while bad.any():
                x[bad] = rng.standard_normal(int(bad.sum()))
                bad = np.abs(x) > 2
            value = x * std
        elif name == "bias":
            value = np.zeros(shape)
        elif name == "scale":
            value = np.ones(shape)
        elif name == "embedding":
            value = rng.standard_normal(shape) * 0.02
        else:
            raise ValueError(f"host_init: no initialiser for param {'/'.join(path)} {shape}")
        out[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def fit(task: loop.Task, phase_cfg: Mapping, cfg: Mapping, folder: str) -> tuple[loop.TrainState, dict]:
    trainer = loop.Trainer(task, _trainer_config(phase_cfg, cfg), folder, mesh=_mesh(cfg))
    rec = _Recorder(folder, int(phase_cfg["log_every"]))
    start = time.perf_counter()
    state = trainer.fit(_forever_empty(), on_step=rec)
    wall = time.perf_counter() - start
    return state, {"wall_s": wall, "steps_run": rec.steps_run, "first_step_s": rec.first_step_s}


def final_params(state: loop.TrainState, ema_decay: float | None, initial: Any) -> Any:
    """The params to export: the trained ones, or their EMA with the initial params' remaining weight
    ``decay**steps`` removed (``(ema − decay**n · init) / (1 − decay**n)``, Adam's bias correction): a short run's
    EMA otherwise still holds a noticeable share of the random init (0.995**400 ≈ 13 %)."""
    if state.ema is None or not ema_decay:
        return jax.device_get(state.trainable)
    remaining = float(ema_decay) ** int(loop.host_value(state.step))
    return jax.tree_util.tree_map(lambda e, i: (np.asarray(e) - remaining * i) / (1.0 - remaining),
                                  jax.device_get(state.ema), initial)


def _to_float(images_u8: jax.Array) -> jax.Array:
    return images_u8.astype(jnp.float32) / 127.5 - 1.0


class VAEPhase:
    """Phase ``vae``: the :class:`train.loop.Task` and what is measured afterwards."""

    def __init__(self, cfg: Mapping, vae_cfg, data: Stage0Data):
        from dynamicid_jax.models.vae import AutoencoderKL, vae_scale_factor

        self.cfg, self.p = cfg, cfg["vae"]
        self.vae = AutoencoderKL(vae_cfg)
        self.factor = vae_scale_factor(vae_cfg)
        self.data = data

    def abstract(self):
        res = self.data.images.shape[1]
        return _boxed(self.vae, jnp.zeros((1, res, res, 3)))

    def initial_params(self, seed: int):
        """Host-initialised params; the posterior log-variance channels of ``quant_conv`` start at
        ``vae.logvar_init`` (kernel 0)."""
        params = host_init(self.abstract(), seed)
        c = self.vae.config.latent_channels
        if self.vae.config.use_quant_conv and self.p["logvar_init"] is not None:
            params["quant_conv"]["kernel"][..., c:] = 0.0
            params["quant_conv"]["bias"][c:] = float(self.p["logvar_init"])
        return params

    def batch(self, images, rng):
        """Random crops (offsets on the latent grid) of random images, optionally mirrored."""
        p = self.p
        b, crop, res = int(p["batch_size"]), int(p["crop"]), images.shape[1]
        k_idx, k_y, k_x, k_flip = jax.random.split(rng, 4)
        x = images[jax.random.randint(k_idx, (b,), 0, images.shape[0])]
        if crop < res:
            cells = (res - crop) // self.factor + 1
            oy = jax.random.randint(k_y, (b,), 0, cells) * self.factor
            ox = jax.random.randint(k_x, (b,), 0, cells) * self.factor
            x = jax.vmap(lambda im, y, xx: jax.lax.dynamic_slice(im, (y, xx, 0), (crop, crop, 3)))(x, oy, ox)
        x = _to_float(_batch_constraint(x))
        if p["hflip"]:
            x = jnp.where(jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1)), x[:, :, ::-1], x)
        return x

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        p = self.p
        k_batch, k_sample = jax.random.split(rng)
        x = self.batch(frozen["images"], k_batch)
        posterior = self.vae.apply({"params": trainable}, x, method="encode")
        y = self.vae.apply({"params": trainable}, posterior.sample(k_sample), method="decode")
        l1 = jnp.mean(jnp.abs(y - x))
        mse = jnp.mean(jnp.square(y - x))
        kl = jnp.mean(posterior.kl())
        loss = float(p["l1_weight"]) * l1 + float(p["mse_weight"]) * mse + float(p["kl_weight"]) * kl
        return loss, ({"l1": l1, "mse": mse, "kl": kl}, mutable)

    def task(self, initial: Any) -> loop.Task:
        """The task, starting from ``initial`` (:meth:`initial_params`)."""
        frozen = {"images": self.data.images}
        return loop.Task(init=None, initial=(initial, {}), abstract_trainable=self.abstract(),
                         abstract_frozen=_spec_tree(frozen), frozen=frozen, loss_fn=self.loss_fn,
                         frozen_source={"stage": "stage0/vae", "data": os.path.abspath(self.cfg["data"]["root"])})

    # ---- after training -----------------------------------------------------------------------------------
    def encode_all(self, params, images: np.ndarray, chunk: int = 128) -> np.ndarray:
        """Posterior moments ``[N, R/f, R/f, 2·C]`` (mean ‖ logvar) of ``images``."""
        enc = jax.jit(lambda p, x: self.vae.apply({"params": p}, _to_float(x), method="encode").moments)
        return _chunked(lambda x: enc(params, x), images, chunk)

    def psnr(self, params, images: np.ndarray, chunk: int = 128) -> float | None:
        """Mean PSNR (dB, images in [0, 1]) of reconstructions from the posterior mean."""
        if len(images) == 0:
            return None

        @jax.jit
        def rec(p, x):
            x = _to_float(x)
            y = self.vae.apply({"params": p}, self.vae.apply({"params": p}, x, method="encode").mean,
                               method="decode")
            mse = jnp.mean(jnp.square((jnp.clip(y, -1, 1) - x) / 2), axis=(1, 2, 3))
            return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))

        return float(np.mean(_chunked(lambda x: rec(params, x), images, chunk)))


def _chunked(fn, images: np.ndarray, chunk: int) -> np.ndarray:
    """``fn`` over ``images`` in chunks of one shape (the last one padded): one compiled program."""
    chunk = min(chunk, len(images))
    out = []
    for i in range(0, len(images), chunk):
        part = images[i:i + chunk]
        pad = chunk - len(part)
        if pad:
            part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
        out.append(np.asarray(fn(part))[:chunk - pad])
    return np.concatenate(out)


LOSS_WEIGHTINGS = ("uniform", "min_snr", "snr_cap", "signal_floor")


def check_loss_weighting(kind: str, gamma: float, floor: float) -> None:
    """The ``diffusion.loss_weighting`` / ``snr_gamma`` / ``weight_floor`` settings :func:`timestep_weights` can
    use; a ValueError naming the setting otherwise (stage 0 checks them before reading any data)."""
    if kind not in LOSS_WEIGHTINGS:
        raise ValueError("diffusion.loss_weighting must be 'uniform', 'min_snr', 'snr_cap' or 'signal_floor', "
                         f"got {kind!r}")
    if kind in ("min_snr", "snr_cap") and not _number(gamma) > 0.0:
        raise ValueError(f"diffusion.snr_gamma must be a number > 0, got {gamma!r}")
    if kind == "signal_floor" and not 0.0 <= _number(floor) <= 1.0:
        raise ValueError(f"diffusion.weight_floor must be a number in [0, 1], got {floor!r}")


def check_diffusion_settings(p: Mapping) -> None:
    """The ``diffusion`` phase's loss settings (:func:`check_loss_weighting`; ``text_aux_weight`` a number ≥ 0,
    0 meaning no auxiliary text loss): stage 0's ``validate()`` runs this before any data is read."""
    check_loss_weighting(p["loss_weighting"], p["snr_gamma"], p["weight_floor"])
    if not _number(p["text_aux_weight"]) >= 0.0:
        raise ValueError(f"diffusion.text_aux_weight must be a number >= 0, got {p['text_aux_weight']!r}")


def _number(value) -> float:
    """``value`` as a float if it is a real number (not a bool), else NaN (which fails every comparison)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


class CosineHead(nn.Module):
    """Logits ``10 · cos(x, w_c)`` of ``classes`` classes."""

    classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.classes))
        x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        return 10.0 * x @ (w / jnp.linalg.norm(w, axis=0, keepdims=True))


class ExpressionReadout(nn.Module):
    """The auxiliary text loss's two cosine classifiers (docs/demo.md, *What moved what*): the expression named in
    a prompt, read from the text encoder's pooled output (what the IMR's motion fusion sees) and from the mean of
    its context (what the UNet's cross-attention sees). Cosine logits × 10, so the classes can only be told apart
    by the direction of the embeddings, not by scaling a head up."""

    classes: int

    @nn.compact
    def __call__(self, pooled: jax.Array, context_mean: jax.Array) -> tuple[jax.Array, jax.Array]:
        return (CosineHead(self.classes, name="pooled")(pooled),
                CosineHead(self.classes, name="context_mean")(context_mean))


def timestep_weights(scheduler, kind: str, gamma: float = 5.0, floor: float = 0.25) -> np.ndarray:
    """Per-timestep loss weights, normalised to mean 1 over the training timesteps: ``"uniform"`` (1),
    ``"min_snr"`` (Min-SNR-γ: min(SNR, γ)/SNR for ε-, min(SNR, γ)/(SNR + 1) for v-prediction: less weight on the
    nearly clean timesteps and, for v, on the noisiest ones too) or ``"snr_cap"`` (min(SNR, γ)/SNR for either
    prediction: only the nearly clean timesteps, SNR > γ, lose weight; the noisiest ones, where an image's layout
    and colours are decided, keep theirs — docs/demo.md, What moved what) or ``"signal_floor"`` (max(ᾱ_t, floor):
    the weight Min-SNR-γ takes off the noisiest timesteps on v-prediction, its factor ᾱ_t = SNR/(SNR + 1), taken
    off only down to ``floor``; the nearly clean ones keep theirs — between uniform and Min-SNR-γ)."""
    from dynamicid_jax.schedulers.noise_schedule import alphas_cumprod

    check_loss_weighting(kind, gamma, floor)
    ac = alphas_cumprod(scheduler.config, False).astype(np.float64)
    snr = ac / (1.0 - ac)
    if kind == "uniform":
        w = np.ones_like(snr)
    elif kind == "min_snr":
        w = np.minimum(snr, gamma) / (snr if scheduler.config.prediction_type == "epsilon" else snr + 1.0)
    elif kind == "snr_cap":
        w = np.minimum(snr, gamma) / snr
    else:  # signal_floor
        w = np.maximum(ac, floor)
    return (w / w.mean()).astype(np.float32)


def latent_scaling_factor(moments: np.ndarray, seed: int = 0) -> float:
    """1 / std of latents sampled from ``moments`` (one sample per image, a fixed key): SD's recipe."""
    from dynamicid_jax.models.vae import DiagonalGaussian

    z = DiagonalGaussian.from_moments(jnp.asarray(moments)).sample(jax.random.key(seed))
    return float(1.0 / jnp.std(z))


class DiffusionPhase:
    """Phase ``diffusion``: text encoder + UNet, ε-MSE on SD1.5's DDPM schedule, the VAE frozen (latent moments)."""

    def __init__(self, cfg: Mapping, text_cfg, unet_cfg, scheduler, moments: np.ndarray, scaling_factor: float,
                 data: Stage0Data, pair_moments: np.ndarray | None = None):
        from dynamicid_jax.models.clip import CLIPTextModel
        from dynamicid_jax.models.unet import UNet2DConditionModel

        self.cfg, self.p = cfg, cfg["diffusion"]
        self.text_encoder = CLIPTextModel(text_cfg)
        self.unet = UNet2DConditionModel(unet_cfg)
        self.scheduler = scheduler
        self.scaling_factor = float(scaling_factor)
        self.frozen = {"moments": np.asarray(moments, np.float32), "token_ids": data.token_ids,
                       "empty_ids": data.empty_ids}
        self.context_len = int(data.token_ids.shape[-1])
        self.pair_batch = int(self.p.get("pair_batch_size") or 0)
        if self.pair_batch:
            if pair_moments is None or data.pair_token_ids is None:
                raise ValueError("diffusion.pair_batch_size > 0 needs the pairs' latent moments and captions")
            self.frozen["pair_moments"] = np.asarray(pair_moments, np.float32)
            self.frozen["pair_token_ids"] = data.pair_token_ids
        check_diffusion_settings(self.p)
        self.weights = timestep_weights(scheduler, self.p["loss_weighting"], float(self.p["snr_gamma"]),
                                        float(self.p["weight_floor"]))
        self.text_aux_weight = float(self.p["text_aux_weight"])
        self.readout = ExpressionReadout(len(EXPRESSIONS)) if self.text_aux_weight > 0 else None
        if self.readout is not None:
            self.frozen["expression_labels"] = np.asarray(data.expression_labels, np.int32)

    def _dummy(self):
        h, w, c2 = self.frozen["moments"].shape[1:]
        return (jnp.zeros((1, h, w, c2 // 2)), jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, self.context_len, self.unet.config.cross_attention_dim)))

    def abstract(self):
        out = {"text_encoder": _boxed(self.text_encoder, jnp.zeros((1, self.context_len), jnp.int32)),
               "unet": _boxed(self.unet, *self._dummy())}
        if self.readout is not None:
            width = self.text_encoder.config.hidden_size
            out["expression_readout"] = _boxed(self.readout, jnp.zeros((1, width)), jnp.zeros((1, width)))
        return out

    def initial_params(self, seed: int):
        return host_init(self.abstract(), seed)

    def text_ids(self, frozen, idx, rng):
        """Per sample: empty with ``p_empty``, caption + face prompt with ``p_face_prompt``, caption + grid prompt
        with ``p_grid_prompt``, else the caption (one uniform draw, consecutive bands) → ``(ids, names_expression)``,
        the second true where the text names the image's expression (a face or grid prompt)."""
        d = self.cfg["data"]
        p_empty, p_face, p_grid = (float(d[k]) for k in ("p_empty", "p_face_prompt", "p_grid_prompt"))
        u = jax.random.uniform(rng, idx.shape)
        variant = jnp.where(u < p_empty + p_face, 1, jnp.where(u < p_empty + p_face + p_grid, 2, 0))
        ids = frozen["token_ids"][idx, variant]
        empty = u < p_empty
        return jnp.where(empty[:, None], frozen["empty_ids"][None], ids), (variant > 0) & ~empty

    def _per_sample_loss(self, unet_params, moments, context, rng):
        """Weighted per-sample v- (or ε-) MSE of the UNet on noised samples of ``moments`` → ``([B], [B])``."""
        from dynamicid_jax.models.vae import DiagonalGaussian

        k_lat, k_t, k_noise = jax.random.split(rng, 3)
        b = moments.shape[0]
        latents = DiagonalGaussian.from_moments(moments).sample(k_lat) * self.scaling_factor
        sched = self.scheduler
        t = jax.random.randint(k_t, (b,), 0, sched.config.num_train_timesteps)
        noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
        pred = self.unet.apply({"params": unet_params}, sched.add_noise(latents, noise, t), t, context)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        per_sample = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))
        return jnp.asarray(self.weights)[t] * per_sample, per_sample

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        """Portraits (``batch_size``) and, with ``pair_batch_size``, two-person images: one text-encoder call for
        both, one UNet call per image shape; the loss is the mean over all samples."""
        b, pb = int(self.p["batch_size"]), self.pair_batch
        k_idx, k_text, k_single, k_pair, k_pidx, k_ptext = jax.random.split(rng, 6)
        idx = _batch_constraint(jax.random.randint(k_idx, (b,), 0, frozen["moments"].shape[0]))
        ids, names_expression = self.text_ids(frozen, idx, k_text)
        if pb:
            pidx = _batch_constraint(jax.random.randint(k_pidx, (pb,), 0, frozen["pair_moments"].shape[0]))
            p_empty = float(self.cfg["data"]["p_empty"])
            drop = jax.random.uniform(k_ptext, (pb,)) < p_empty
            pair_ids = jnp.where(drop[:, None], frozen["empty_ids"][None], frozen["pair_token_ids"][pidx])
            ids = jnp.concatenate([ids, pair_ids], axis=0)
        text = self.text_encoder.apply({"params": trainable["text_encoder"]}, ids)
        context = text.last_hidden_state
        weighted, per_sample = self._per_sample_loss(trainable["unet"], frozen["moments"][idx], context[:b], k_single)
        metrics = {"mse": jnp.mean(per_sample)}
        aux = 0.0
        if self.readout is not None:
            aux, metrics["text_aux_ce"], metrics["text_aux_acc"] = self._text_aux(
                trainable["expression_readout"], text.pooler_output[:b], context[:b].mean(axis=1),
                frozen["expression_labels"][idx], names_expression)
        if pb:
            w_pair, s_pair = self._per_sample_loss(trainable["unet"], frozen["pair_moments"][pidx], context[b:],
                                                   k_pair)
            weighted = jnp.concatenate([weighted, w_pair])
            metrics["mse_pairs"] = jnp.mean(s_pair)
        return jnp.mean(weighted) + aux, (metrics, mutable)

    def _text_aux(self, params, pooled, context_mean, labels, mask):
        """``text_aux_weight`` × the readout's cross-entropy (both heads, averaged over the texts that name an
        expression); also returns the cross-entropy and the pooled head's accuracy, as metrics."""
        logits = self.readout.apply({"params": params}, pooled, context_mean)
        ce = sum(optax.softmax_cross_entropy_with_integer_labels(lg, labels) for lg in logits) / len(logits)
        m = mask.astype(jnp.float32)
        count = jnp.maximum(jnp.sum(m), 1.0)
        ce = jnp.sum(ce * m) / count
        acc = jnp.sum((jnp.argmax(logits[0], -1) == labels) * m) / count
        return self.text_aux_weight * ce, ce, acc

    def task(self, initial: Any) -> loop.Task:
        """The task, starting from ``initial`` (:meth:`initial_params`)."""
        return loop.Task(init=None, initial=(initial, {}), abstract_trainable=self.abstract(),
                         abstract_frozen=_spec_tree(self.frozen), frozen=self.frozen, loss_fn=self.loss_fn,
                         frozen_source={"stage": "stage0/diffusion",
                                        "data": os.path.abspath(self.cfg["data"]["root"])})
