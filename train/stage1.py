"""Stage 1 (anchoring, docs/method.md §6.1): train the ID encoder and SAA (LoRA + ``to_k_ip``/``to_v_ip``) with ε-MSE.

    python -m train.stage1 --config train/configs/stage1_sd15.yaml [key.sub=value ...]
    path = train.stage1.run("train/configs/synthface_stage1.yaml", ["model.base=...", "workdir=..."])  # in-process

Frozen: UNet base, VAE, text encoder, CLIP-H image encoder (ArcFace embeddings come precomputed in the data).
Per sample: one uniform draw ``u``; ``u < p_id`` drops the ID (zero ArcFace vector + zero normalised CLIP input,
i.e. the CLIP features of the grey image), ``p_id ≤ u < p_id + p_text`` drops the text (the prompt ``""``),
the next ``p_both`` drops both. Latents = ``sample(moments) · scaling_factor`` (or the VAE encoding of
``target_pixels``), uniform ``t`` over the training timesteps, target ε (or v for v-prediction models). The SAA
gate is on (``method.gate``) with one identity and the whole image as its box. At the end the trainable params
are exported to ``{workdir}/export/stage1.safetensors`` (``id_encoder/…`` and ``saa/…`` keys), which stage 2 and
the token cache read. The export's metadata holds the ID encoder / SAA / UNet configs and the CLIP vision folder
(a ``random:`` image encoder is saved to ``{workdir}/export/image_encoder/``), so the later steps need nothing else.

Runs (resume, skip when finished, refuse a workdir of other settings): :func:`train.runs.run_stage`.

Batch contract (data_pipelines.loaders.stage1_loader): ``target_pixels [B,H,W,3]`` in [-1, 1] or
``target_latent_moments [B,H/f,W/f,8]`` (f = the VAE's scale factor); ``ref_clip_pixels [B,S,S,3]`` (CLIP-normalised,
S = the image encoder's input size; ``data.clip_size`` 0 picks it) or
``ref_clip_features [B,257,1280]``; ``ref_id_embedding [B,D]``; ``input_ids int32 [B,77]``; ``identity``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dynamicid_jax.methods import id_encoder as ide
from dynamicid_jax.methods import saa as saa_lib
from dynamicid_jax.models.unet import UNet2DConditionModel
from dynamicid_jax.models.vae import DiagonalGaussian, vae_scale_factor
from train import loop, runs
from train.config import loader_config, stage_defaults

log = logging.getLogger(__name__)

EXPORT_FORMAT = "dynamicid-jax/stage1-export-v1"

#: the stage's defaults: train/configs/defaults/stage1.yaml + the shared sections of training.yaml
DEFAULTS: dict[str, Any] = stage_defaults("stage1")


@functools.lru_cache(maxsize=4)
def abstract_unet(unet_config):
    """The base UNet's boxed abstract params (cached: tracing its init takes seconds; treat as read-only)."""
    from dynamicid_jax.models import unet as unet_lib

    return unet_lib.abstract_params(UNet2DConditionModel(unet_config))


def face_weighted_mse(pred: jax.Array, target: jax.Array, face_box: jax.Array | None, weight: float) -> jax.Array:
    """The stage-1 ε-MSE; with ``weight > 0`` the latent cells inside the target's face box count ``1 + weight``
    times (a weighted mean, so the loss keeps its scale). ``weight = 0`` is the plain mean (docs/training.md:
    face-weighted loss). ``face_box [B, 4]``: normalised ``[y0, x0, y1, x1]`` (the loader's ``target_face_box``);
    a cell is inside when its centre is."""
    sq = jnp.square(pred - target)
    if weight == 0.0:
        return jnp.mean(sq)
    if face_box is None:
        raise KeyError("method.face_loss_weight > 0 needs batches with target_face_box (the shard loader's)")
    h, w = sq.shape[1:3]
    ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    box = face_box.astype(jnp.float32)
    inside_y = (ys[None, :] >= box[:, 0:1]) & (ys[None, :] < box[:, 2:3])  # [B, H]
    inside_x = (xs[None, :] >= box[:, 1:2]) & (xs[None, :] < box[:, 3:4])  # [B, W]
    weights = 1.0 + weight * (inside_y[:, :, None] & inside_x[:, None, :]).astype(jnp.float32)  # [B, H, W]
    per_cell = jnp.mean(sq, axis=-1)
    return jnp.mean(jnp.sum(weights * per_cell, axis=(1, 2)) / jnp.sum(weights, axis=(1, 2)))


def drop_masks(rng: jax.Array, batch: int, p_id: float, p_text: float, p_both: float):
    """One uniform draw per sample → ``(drop_id, drop_text)`` booleans ``[B]`` (docs/method.md §6.1 bands)."""
    u = jax.random.uniform(rng, (batch,))
    id_only = u < p_id
    text_only = (u >= p_id) & (u < p_id + p_text)
    both = (u >= p_id + p_text) & (u < p_id + p_text + p_both)
    return id_only | both, text_only | both


class Stage1:
    """Builds the stage-1 :class:`~train.loop.Task` from a config (see :data:`DEFAULTS`)."""

    def __init__(self, cfg, base: runs.BaseModel | None = None, image_encoder: tuple | None = None):
        self.cfg = cfg
        m = cfg["model"]
        self.dtype = runs.compute_dtype(m["dtype"])
        self.base = base if base is not None else runs.load_base(m["base"], self.dtype)
        b = self.base
        self.vae_factor = vae_scale_factor(b.vae.config)
        self.strategy = saa_lib.SAA(lora_rank=int(m["lora_rank"]))
        self.unet = UNet2DConditionModel(b.unet_config, strategy=self.strategy, dtype=self.dtype,
                                         remat_policy=m.get("remat"))
        enc_cfg = ide.id_encoder_config(m["id_encoder_variant"], **dict(m.get("id_encoder_overrides") or {}))
        if enc_cfg.dim != b.unet_config.cross_attention_dim:
            raise ValueError(f"the ID encoder's width ({enc_cfg.dim}) must equal the UNet's cross_attention_dim "
                             f"({b.unet_config.cross_attention_dim})")
        self.id_encoder = ide.IDEncoder(enc_cfg, dtype=self.dtype)
        self.image_module, image_params, image_source = (image_encoder if image_encoder is not None else
                                                         runs.load_image_encoder(m["image_encoder"], self.dtype))
        if self.image_module is not None and self.image_module.config.hidden_size != enc_cfg.clip_dim:
            raise ValueError(f"the ID encoder takes {enc_cfg.clip_dim}-wide CLIP features but the image encoder "
                             f"{m['image_encoder']!r} is {self.image_module.config.hidden_size} wide (set "
                             f"model.id_encoder_overrides.clip_dim)")
        self.image_params, self.image_source = image_params, image_source
        self.clip_size = resolve_clip_size(cfg["data"], self.image_module)
        self.frozen = {"unet": b.params["unet"], "vae": b.params["vae"], "text_encoder": b.params["text_encoder"]}
        if b.is_sdxl:
            self.frozen["text_encoder_2"] = b.params["text_encoder_2"]
        if self.image_module is not None:
            self.frozen["image_encoder"] = image_params
        from dynamicid_jax.tokenizer import tokenize

        self.empty_ids = np.asarray(tokenize(b.tokenizer, [""]), np.int32)  # [1, 77]
        self.uncond_clip = self._uncond_clip_features(m, image_params)
        self.frozen_source = {"base": b.source, "image_encoder": image_source, "stage": "stage1"}

    # ---- pieces ---------------------------------------------------------------------------------------------
    def _uncond_clip_features(self, m, image_params) -> np.ndarray | None:
        if self.image_module is not None:
            size = self.image_module.config.image_size
            pixels = ide.unconditional_clip_pixels(1, size)
            return np.asarray(jax.jit(runs.clip_penultimate, static_argnums=0)(self.image_module, image_params,
                                                                                  pixels), np.float32)
        if m.get("uncond_clip_features"):
            return np.load(m["uncond_clip_features"]).astype(np.float32)
        return None

    def clip_features(self, frozen, batch, drop_id):
        if "ref_clip_features" in batch:
            feats = batch["ref_clip_features"].astype(jnp.float32)
            if self.uncond_clip is None:
                raise ValueError("dropping the ID with precomputed CLIP features needs model.image_encoder or "
                                 "model.uncond_clip_features (the CLIP features of the grey image)")
            return jnp.where(drop_id[:, None, None], jnp.asarray(self.uncond_clip), feats)
        if "ref_clip_pixels" not in batch:
            raise KeyError("a stage-1 batch needs ref_clip_pixels or ref_clip_features")
        if self.image_module is None:
            raise ValueError("batches with ref_clip_pixels need model.image_encoder")
        pixels = jnp.where(drop_id[:, None, None, None], 0.0, batch["ref_clip_pixels"].astype(jnp.float32))
        return runs.clip_penultimate(self.image_module, frozen["image_encoder"], pixels).astype(jnp.float32)

    def latents(self, frozen, batch, rng):
        if "target_latent_moments" in batch:
            dist = DiagonalGaussian.from_moments(batch["target_latent_moments"])
        elif "target_pixels" in batch:
            dist = self.base.vae.apply({"params": frozen["vae"]}, batch["target_pixels"], method="encode")
        else:
            raise KeyError("a stage-1 batch needs target_latent_moments or target_pixels")
        return dist.sample(rng) * self.base.scaling_factor

    def saa_inputs(self, latent_hw: tuple[int, int]):
        f = self.vae_factor  # the image size in pixels: latent × the VAE's scale factor
        return saa_lib.saa_inputs(1, (f * latent_hw[0], f * latent_hw[1]),
                                  id_scale=float(self.cfg["method"]["id_scale"]),
                                  activate_query=bool(self.cfg["method"]["gate"]))

    def id_tokens(self, trainable, id_embeds, clip_features):
        return self.id_encoder.apply({"params": trainable["id_encoder"]}, id_embeds, clip_features)

    def unet_params(self, trainable, frozen):
        return saa_lib.merge_params(frozen["unet"], trainable["saa"])

    def text_embeddings(self, frozen, ids, ids_2=None):
        """``(context, pooled)``; ``pooled`` is SDXL's pooled text embedding (``None`` on SD1.x). ``ids_2``: SDXL
        tokenizer 2's ids when the data has them (``input_ids_2``), else derived from ``ids``."""
        return self.base.text_conditioning(frozen, ids, ids_2)

    # ---- the task -------------------------------------------------------------------------------------------
    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        meth = self.cfg["method"]
        b = batch["input_ids"].shape[0]
        k_drop, k_lat, k_t, k_noise = jax.random.split(rng, 4)
        drop_id, drop_text = drop_masks(k_drop, b, float(meth["drop_id"]), float(meth["drop_text"]),
                                        float(meth["drop_both"]))
        ids = jnp.where(drop_text[:, None], jnp.asarray(self.empty_ids), batch["input_ids"].astype(jnp.int32))
        ids_2 = None
        if "input_ids_2" in batch:  # SDXL data with tokenizer 2's own ids; "" tokenizes alike in both but padding
            from dynamicid_jax.pipelines.stable_diffusion_xl import tokenizer_2_ids

            ids_2 = jnp.where(drop_text[:, None], tokenizer_2_ids(jnp.asarray(self.empty_ids)),
                              batch["input_ids_2"].astype(jnp.int32))
        text, pooled = self.text_embeddings(frozen, ids, ids_2)
        feats = self.clip_features(frozen, batch, drop_id)
        id_embeds = jnp.where(drop_id[:, None], 0.0, batch["ref_id_embedding"].astype(jnp.float32))
        tokens = self.id_tokens(trainable, id_embeds, feats)
        latents = self.latents(frozen, batch, k_lat)
        sched = self.base.scheduler
        t = jax.random.randint(k_t, (b,), 0, sched.config.num_train_timesteps)
        noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
        noisy = sched.add_noise(latents, noise, t)
        context = saa_lib.saa_context(text.astype(self.dtype), tokens)
        pred = self.unet.apply({"params": self.unet_params(trainable, frozen)}, noisy, t, context,
                               self.saa_inputs(latents.shape[1:3]),
                               *self.base.added_cond(pooled, latents.shape[1:3])).astype(jnp.float32)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        loss = face_weighted_mse(pred, target, batch.get("target_face_box"), float(meth["face_loss_weight"]))
        return loss, ({"drop_id_frac": jnp.mean(drop_id), "drop_text_frac": jnp.mean(drop_text)}, mutable)

    def init(self, rng, frozen):
        k_enc, k_saa = jax.random.split(rng)
        m = self.cfg["model"]
        if m.get("id_encoder_init"):
            loaded = runs.load_params(m["id_encoder_init"])
            enc = jax.tree_util.tree_map(jnp.asarray, loaded["id_encoder"])
            saa = jax.tree_util.tree_map(jnp.asarray, loaded["saa"])
            return {"id_encoder": enc, "saa": saa}, {}
        enc = ide.init_params(self.id_encoder, k_enc)
        merged = saa_lib.init_ip_from_base(saa_lib.merge_params(frozen["unet"], self._fresh_saa(k_saa)))
        return {"id_encoder": enc, "saa": saa_lib.split_saa_params(merged)[1]}, {}

    def _fresh_saa(self, rng) -> dict:
        """SAA's training initialisation in one random draw: every LoRA ``down`` from a single normal vector
        (SAA's own ``down`` initialiser: i.i.d. entries, so one draw split into the leaves has the same
        distribution), ``up`` = 0, ``to_k_ip``/``to_v_ip`` placeholders that :func:`init_ip_from_base` replaces.
        One draw instead of one per leaf keeps the jitted init quick to compile (seconds, not tens)."""
        flat = traverse_util.flatten_dict(nn.meta.unbox(
            saa_lib.abstract_saa_params(self.base.unet_config, self.strategy)))
        downs = sorted(p for p in flat if p[-2] == "down")
        sizes = [int(np.prod(flat[p].shape)) for p in downs]
        draw = saa_lib._initializer("down", self.strategy.lora_rank)(rng, (max(sum(sizes), 1),), jnp.float32)
        out, offset = {}, 0
        for path in sorted(flat):
            if path[-2] == "down":
                n = int(np.prod(flat[path].shape))
                out[path] = draw[offset:offset + n].reshape(flat[path].shape)
                offset += n
            else:  # LoRA up (zero) and the *_ip kernels (copied from to_k / to_v by init_ip_from_base)
                out[path] = jnp.zeros(flat[path].shape, jnp.float32)
        return traverse_util.unflatten_dict(out)

    def abstract_trainable(self):
        return {"id_encoder": ide.abstract_params(self.id_encoder),
                "saa": saa_lib.abstract_saa_params(self.base.unet_config, self.strategy)}

    def abstract_frozen(self):
        from dynamicid_jax.models import vae as vae_lib

        out = {"unet": abstract_unet(self.base.unet_config),
               "vae": vae_lib.abstract_params(self.base.vae),
               "text_encoder": runs.boxed_abstract(self.base.text_encoder, jnp.zeros((1, 77), jnp.int32))}
        if self.base.is_sdxl:
            out["text_encoder_2"] = runs.boxed_abstract(self.base.text_encoder_2, jnp.zeros((1, 77), jnp.int32))
        if self.image_module is not None:
            size = self.image_module.config.image_size
            out["image_encoder"] = runs.boxed_abstract(self.image_module, jnp.zeros((1, size, size, 3)))
        return out

    def sample_fn(self, references: dict):
        """Sample grid: every prompt × the first reference, DDIM with CFG (uncond = empty prompt + ID tokens of
        the grey image / zero embedding)."""
        from dynamicid_jax.pipelines.sampling import denoise, to_uint8
        from dynamicid_jax.models.vae import decode_latents
        from dynamicid_jax.tokenizer import tokenize

        s = self.cfg["sample"]
        prompts = list(s["prompts"])
        n = len(prompts)
        ids = jnp.asarray(tokenize(self.base.tokenizer, prompts), jnp.int32)
        size, f = int(s["size"]), self.vae_factor
        multiple = f * 2 ** (len(self.base.unet_config.block_out_channels) - 1)  # VAE factor × UNet downsampling
        if size <= 0 or size % multiple:
            raise ValueError(f"sample.size must be a positive multiple of {multiple}, got {size}")
        sched = self.base.scheduler  # DDIM (load_base asks for it)
        ref_embed = jnp.asarray(references["ref_id_embedding"][:1], jnp.float32)
        ref_clip = {k: jnp.asarray(references[k][:1]) for k in ("ref_clip_features", "ref_clip_pixels")
                    if k in references}

        def sample(trainable, frozen, mutable):
            one = jnp.zeros((1,), bool)
            feats = self.clip_features(frozen, ref_clip, one)
            tokens = self.id_tokens(trainable, ref_embed, feats)
            un_feats = self.clip_features(frozen, ref_clip, ~one)
            un_tokens = self.id_tokens(trainable, jnp.zeros_like(ref_embed), un_feats)
            text, pooled = self.text_embeddings(frozen, ids)
            empty, empty_pooled = self.text_embeddings(frozen, jnp.asarray(self.empty_ids))
            cond = saa_lib.saa_context(text, tokens)  # one reference's tokens for every prompt
            uncond = saa_lib.saa_context(jnp.repeat(empty, n, 0), un_tokens)
            shape = (n, size // f, size // f, self.base.unet_config.in_channels)
            latents = jax.random.normal(jax.random.key(0), shape, jnp.float32)
            inputs = self.saa_inputs((size // f, size // f))
            added = {}
            if self.base.is_sdxl:  # SDXL: pooled text + micro-conditioning, the unconditional rows those of ""
                added = {"added_cond": self.base.added_cond(pooled, shape[1:3])[0],
                         "uncond_added_cond": self.base.added_cond(jnp.repeat(empty_pooled, n, 0), shape[1:3])[0]}
            out = denoise(self.unet, self.unet_params(trainable, frozen), sched, int(s["steps"]), latents, cond,
                          float(s["guidance_scale"]), attention_inputs=inputs, uncond_context=uncond, **added)
            return to_uint8(decode_latents(self.base.vae, frozen["vae"], out))

        return sample

    def task(self, references: dict | None = None) -> loop.Task:
        return loop.Task.of(self, sample_fn=self.sample_fn(references) if references is not None else None)

    def export(self, state: loop.TrainState, workdir: str, *, fingerprint: str = "") -> str | None:
        """Write the trainable params (EMA if kept) to ``{workdir}/export/stage1.safetensors`` (process 0), with
        the configs the later steps need in its metadata; a ``random:`` image encoder is saved beside it."""
        params = loop.replicated_to_host(state.ema if state.ema is not None else state.trainable)
        if jax.process_index() != 0:
            return None
        folder = os.path.join(workdir, "export")
        image_encoder = self.image_source
        if self.image_module is not None and self.image_source.startswith("random:"):
            from dynamicid_jax.models.clip import save_image_encoder

            image_encoder = save_image_encoder(os.path.join(folder, "image_encoder"), self.image_module,
                                               self.image_params)
        meta = {"format": EXPORT_FORMAT, "step": str(int(loop.host_value(state.step))), "base": self.base.source,
                "fingerprint": fingerprint, "image_encoder": image_encoder,
                "id_encoder_config": json.dumps(self.id_encoder.config.to_dict()),
                "saa": json.dumps(dataclasses.asdict(self.strategy)),
                "unet_config": json.dumps(self.base.unet_config.to_dict())}
        return runs.save_params(params, os.path.join(folder, "stage1.safetensors"), metadata=meta)


#: the export's path inside the workdir
EXPORT = os.path.join("export", "stage1.safetensors")


def load(config: Any = None, overrides: Sequence[str] = (), defaults: Mapping | None = None):
    """A stage config (:func:`train.runs.load`) over stage 1's defaults unless ``defaults`` are given."""
    return runs.load(config, overrides, DEFAULTS if defaults is None else defaults)


def resolve_clip_size(d: Mapping, image_module) -> int:
    """``data.clip_size`` (0 = the image encoder's input size; 224 without an image encoder)."""
    size = int(d.get("clip_size") or 0)
    if image_module is None:
        return size or 224
    want = int(image_module.config.image_size)
    if size and size != want:
        raise ValueError(f"data.clip_size={size} but the image encoder takes {want}×{want} inputs (use 0 to follow "
                         f"the image encoder)")
    return want


def make_data(cfg, clip_size: int | None = None):
    """This process's stage-1 Grain iterator (data_pipelines.loaders.stage1_loader)."""
    from data_pipelines import loaders

    d = dict(cfg["data"])
    if not d["shards"]:
        raise ValueError("data.shards must name a folder of face shards (data_pipelines)")
    d["clip_size"] = clip_size if clip_size is not None else (int(d.get("clip_size") or 0) or 224)
    conf = loader_config(loaders.Stage1Config, d, batch_size=int(d["batch_size"]),
                                distinct_reference=bool(d["distinct_reference"]))
    return iter(loaders.stage1_loader(d["shards"], conf))


def run(config: Any = None, overrides: Sequence[str] = (), *, workdir: str | None = None, mesh=None,
        base: runs.BaseModel | None = None, image_encoder: tuple | None = None) -> str:
    """Train stage 1 (or resume, or skip when finished: :func:`train.runs.run_stage`) → the export's path.

    ``config``: a YAML path, a mapping or a loaded config; ``overrides``: ``key.sub=value`` strings; ``mesh``: a
    device mesh (default: every device, ``mesh`` section); ``base`` / ``image_encoder``: already loaded models."""

    def embed_dim(cfg) -> int:
        m = cfg["model"]
        return ide.id_encoder_config(m["id_encoder_variant"], **dict(m.get("id_encoder_overrides") or {})).id_embed_dim

    def inputs(cfg) -> dict[str, str]:
        m = cfg["model"]
        return {"base": m["base"] if base is None else base.source, "shards": cfg["data"]["shards"],
                "image_encoder": m["image_encoder"], "id_encoder_init": m["id_encoder_init"]}

    def train(cfg, workdir: str, fingerprint: str) -> str:
        stage = Stage1(cfg, base=base, image_encoder=image_encoder)
        references = next(make_data(cfg, stage.clip_size)) if cfg["train"].get("sample_every") else None
        trainer = loop.Trainer(stage.task(references=references), cfg, workdir, mesh=mesh)
        state = trainer.fit(make_data(cfg, stage.clip_size))
        return stage.export(state, workdir, fingerprint=fingerprint) or os.path.join(workdir, EXPORT)

    return runs.run_stage(runs.StageRun("stage 1", DEFAULTS, EXPORT, embed_dim, inputs, train), config, overrides,
                          workdir=workdir)


def main(argv=None) -> int:
    return runs.stage_main(__doc__, run, argv)


if __name__ == "__main__":
    from dynamicid_jax.errors import run_cli

    raise SystemExit(run_cli(main))
