"""Stage 1 (anchoring, SPEC §6): train the ID encoder and SAA (LoRA + ``to_k_ip``/``to_v_ip``) with ε-MSE.

    python -m train.stage1 --config train/configs/stage1_sd15.yaml [key.sub=value ...]

Frozen: UNet base, VAE, text encoder, CLIP-H image encoder (ArcFace embeddings come precomputed in the data).
Per sample: one uniform draw ``u``; ``u < p_id`` drops the ID (zero ArcFace vector + zero normalised CLIP input,
i.e. the CLIP features of the grey image), ``p_id ≤ u < p_id + p_text`` drops the text (the prompt ``""``),
the next ``p_both`` drops both. Latents = ``sample(moments) · scaling_factor`` (or the VAE encoding of
``target_pixels``), uniform ``t`` over the training timesteps, target ε (or v for v-prediction models). The SAA
gate is on (``method.gate``) with one identity and the whole image as its box. At the end the trainable params
are exported to ``{workdir}/export/stage1.safetensors`` (``id_encoder/…`` and ``saa/…`` keys), which stage 2 and
the token cache read.

Batch contract (data_pipelines.loaders.stage1_loader): ``target_pixels [B,H,W,3]`` in [-1, 1] or
``target_latent_moments [B,H/8,W/8,8]``; ``ref_clip_pixels [B,224,224,3]`` (CLIP-normalised) or
``ref_clip_features [B,257,1280]``; ``ref_id_embedding [B,D]``; ``input_ids int32 [B,77]``; ``identity``.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax.methods import id_encoder as ide
from dynamicid_jax.methods import saa as saa_lib
from dynamicid_jax.models.unet import UNet2DConditionModel
from dynamicid_jax.models.vae import DiagonalGaussian
from train import common, loop

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "workdir": "",
    "model": {
        "base": "",  # SD1.5 diffusers folder or single .safetensors
        "image_encoder": "",  # CLIP-H vision folder, or "random:<variant>"; "" → data must carry CLIP features
        "uncond_clip_features": "",  # .npy [1, L, C]: CLIP features of the grey image when image_encoder is ""
        "id_encoder_variant": "sd15",
        "id_encoder_overrides": {},  # IDEncoderConfig fields, e.g. {id_embed_dim: 128} for dlib embeddings
        "id_encoder_init": "",  # optional: a stage-1 export (.safetensors) to start from
        "lora_rank": 128,
        "dtype": "bfloat16",  # compute dtype; params stay fp32
        "remat": None,  # UNet remat policy: None, "full", "dots", "dots_no_batch", "nothing", "everything"
    },
    "method": {"gate": True, "drop_id": 0.05, "drop_text": 0.05, "drop_both": 0.05, "id_scale": 1.0},
    "data": {"shards": "", "batch_size": 8, "resolution": 512, "seed": 0, "worker_count": 0, "read_threads": 4,
             "distinct_reference": True, "latents": "auto", "clip": "auto", "clip_size": 224, "tokenizer": None},
    "sample": {"prompts": ["a photo of a person", "a portrait of a person, oil painting"], "steps": 25,
               "guidance_scale": 5.0, "size": 512},
    **common.training_sections(loop),
}


def drop_masks(rng: jax.Array, batch: int, p_id: float, p_text: float, p_both: float):
    """One uniform draw per sample → ``(drop_id, drop_text)`` booleans ``[B]`` (SPEC §6 bands)."""
    u = jax.random.uniform(rng, (batch,))
    id_only = u < p_id
    text_only = (u >= p_id) & (u < p_id + p_text)
    both = (u >= p_id + p_text) & (u < p_id + p_text + p_both)
    return id_only | both, text_only | both


class Stage1:
    """Builds the stage-1 :class:`~train.loop.Task` from a config (see :data:`DEFAULTS`)."""

    def __init__(self, cfg, base: common.BaseModel | None = None, image_encoder: tuple | None = None):
        self.cfg = cfg
        m = cfg["model"]
        self.dtype = common.compute_dtype(m["dtype"])
        self.base = base if base is not None else common.load_base(m["base"], self.dtype)
        b = self.base
        self.strategy = saa_lib.SAA(lora_rank=int(m["lora_rank"]))
        self.unet = UNet2DConditionModel(b.unet_config, strategy=self.strategy, dtype=self.dtype,
                                         remat_policy=m.get("remat"))
        enc_cfg = ide.id_encoder_config(m["id_encoder_variant"], **dict(m.get("id_encoder_overrides") or {}))
        if enc_cfg.dim != b.unet_config.cross_attention_dim:
            raise ValueError(f"the ID encoder's width ({enc_cfg.dim}) must equal the UNet's cross_attention_dim "
                             f"({b.unet_config.cross_attention_dim})")
        self.id_encoder = ide.IDEncoder(enc_cfg, dtype=self.dtype)
        self.image_module, image_params, image_source = (image_encoder if image_encoder is not None else
                                                         common.load_image_encoder(m["image_encoder"], self.dtype))
        self.frozen = {"unet": b.params["unet"], "vae": b.params["vae"], "text_encoder": b.params["text_encoder"]}
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
            return np.asarray(jax.jit(common.clip_penultimate, static_argnums=0)(self.image_module, image_params,
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
        return common.clip_penultimate(self.image_module, frozen["image_encoder"], pixels).astype(jnp.float32)

    def latents(self, frozen, batch, rng):
        if "target_latent_moments" in batch:
            dist = DiagonalGaussian.from_moments(batch["target_latent_moments"])
        elif "target_pixels" in batch:
            dist = self.base.vae.apply({"params": frozen["vae"]}, batch["target_pixels"], method="encode")
        else:
            raise KeyError("a stage-1 batch needs target_latent_moments or target_pixels")
        return dist.sample(rng) * self.base.scaling_factor

    def saa_inputs(self, latent_hw: tuple[int, int]):
        return saa_lib.saa_inputs(1, (8 * latent_hw[0], 8 * latent_hw[1]),
                                  id_scale=float(self.cfg["method"]["id_scale"]),
                                  activate_query=bool(self.cfg["method"]["gate"]))

    def id_tokens(self, trainable, id_embeds, clip_features):
        return self.id_encoder.apply({"params": trainable["id_encoder"]}, id_embeds, clip_features)

    def unet_params(self, trainable, frozen):
        return saa_lib.merge_params(frozen["unet"], trainable["saa"])

    def text_embeddings(self, frozen, ids):
        return self.base.text_encoder.apply({"params": frozen["text_encoder"]}, ids).last_hidden_state

    # ---- the task -------------------------------------------------------------------------------------------
    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        meth = self.cfg["method"]
        b = batch["input_ids"].shape[0]
        k_drop, k_lat, k_t, k_noise = jax.random.split(rng, 4)
        drop_id, drop_text = drop_masks(k_drop, b, float(meth["drop_id"]), float(meth["drop_text"]),
                                        float(meth["drop_both"]))
        ids = jnp.where(drop_text[:, None], jnp.asarray(self.empty_ids), batch["input_ids"].astype(jnp.int32))
        text = self.text_embeddings(frozen, ids)
        feats = self.clip_features(frozen, batch, drop_id)
        id_embeds = jnp.where(drop_id[:, None], 0.0, batch["ref_id_embedding"].astype(jnp.float32))
        tokens = self.id_tokens(trainable, id_embeds, feats)
        latents = self.latents(frozen, batch, k_lat)
        sched = self.base.scheduler
        t = jax.random.randint(k_t, (b,), 0, sched.config.num_train_timesteps)
        noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
        noisy = sched.add_noise(latents, noise, t)
        context = jnp.concatenate([text.astype(self.dtype), tokens.astype(self.dtype)], axis=1)
        pred = self.unet.apply({"params": self.unet_params(trainable, frozen)}, noisy, t, context,
                               self.saa_inputs(latents.shape[1:3])).astype(jnp.float32)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        loss = jnp.mean(jnp.square(pred - target))
        return loss, ({"drop_id_frac": jnp.mean(drop_id), "drop_text_frac": jnp.mean(drop_text)}, mutable)

    def init(self, rng, frozen):
        k_enc, k_saa = jax.random.split(rng)
        m = self.cfg["model"]
        if m.get("id_encoder_init"):
            loaded = common.load_params(m["id_encoder_init"])
            enc = jax.tree_util.tree_map(jnp.asarray, loaded["id_encoder"])
            saa = jax.tree_util.tree_map(jnp.asarray, loaded["saa"])
            return {"id_encoder": enc, "saa": saa}, {}
        enc = ide.init_params(self.id_encoder, k_enc)
        saa = saa_lib.init_saa_params(self.base.unet_config, k_saa, self.strategy)
        merged = saa_lib.init_ip_from_base(saa_lib.merge_params(frozen["unet"], saa))
        return {"id_encoder": enc, "saa": saa_lib.split_saa_params(merged)[1]}, {}

    def abstract_trainable(self):
        return {"id_encoder": ide.abstract_params(self.id_encoder),
                "saa": saa_lib.abstract_saa_params(self.base.unet_config, self.strategy)}

    def abstract_frozen(self):
        from dynamicid_jax.models import unet as unet_lib
        from dynamicid_jax.models import vae as vae_lib

        out = {"unet": unet_lib.abstract_params(UNet2DConditionModel(self.base.unet_config)),
               "vae": vae_lib.abstract_params(self.base.vae),
               "text_encoder": common.boxed_abstract(self.base.text_encoder, jnp.zeros((1, 77), jnp.int32))}
        if self.image_module is not None:
            size = self.image_module.config.image_size
            out["image_encoder"] = common.boxed_abstract(self.image_module, jnp.zeros((1, size, size, 3)))
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
        size = int(s["size"])
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
            text = self.text_embeddings(frozen, ids)
            empty = self.text_embeddings(frozen, jnp.asarray(self.empty_ids))
            cond = jnp.concatenate([text, jnp.repeat(tokens, n, 0).astype(text.dtype)], axis=1)
            uncond = jnp.concatenate([jnp.repeat(empty, n, 0), jnp.repeat(un_tokens, n, 0).astype(text.dtype)],
                                     axis=1)
            latents = jax.random.normal(jax.random.key(0), (n, size // 8, size // 8, 4), jnp.float32)
            inputs = self.saa_inputs((size // 8, size // 8))
            out = denoise(self.unet, self.unet_params(trainable, frozen), sched, int(s["steps"]), latents, cond,
                          float(s["guidance_scale"]), attention_inputs=inputs, uncond_context=uncond)
            return to_uint8(decode_latents(self.base.vae, frozen["vae"], out))

        return sample

    def task(self, references: dict | None = None) -> loop.Task:
        return loop.Task(init=self.init, abstract_trainable=self.abstract_trainable(),
                         abstract_frozen=self.abstract_frozen(), frozen=self.frozen, loss_fn=self.loss_fn,
                         sample_fn=self.sample_fn(references) if references is not None else None,
                         frozen_source=self.frozen_source)

    def export(self, state: loop.TrainState, workdir: str) -> str | None:
        """Write the trainable params (EMA if kept) to ``{workdir}/export/stage1.safetensors`` (process 0)."""
        params = loop.replicated_to_host(state.ema if state.ema is not None else state.trainable)
        if jax.process_index() != 0:
            return None
        path = os.path.join(workdir, "export", "stage1.safetensors")
        return common.save_params(params, path, metadata={"step": str(int(loop.host_value(state.step))),
                                                          "base": self.base.source})


def make_data(cfg):
    """This process's stage-1 Grain iterator (data_pipelines.loaders.stage1_loader)."""
    from data_pipelines import loaders

    d = cfg["data"]
    if not d["shards"]:
        raise SystemExit("data.shards must name a folder of face shards (data_pipelines)")
    conf = common.loader_config(loaders.Stage1Config, d, batch_size=int(d["batch_size"]),
                                distinct_reference=bool(d["distinct_reference"]))
    return iter(loaders.stage1_loader(d["shards"], conf))


def main(argv=None) -> int:
    args = common.cli_args(__doc__.split("\n\n")[0], argv)
    common.init_distributed(args)
    common.setup_logging()
    from train.config import load_config

    cfg = load_config(args.config, args.overrides, defaults=DEFAULTS)
    workdir = args.workdir or cfg["workdir"]
    if not workdir:
        raise SystemExit("give --workdir or workdir: in the config")
    if not cfg["data"]["shards"]:
        raise SystemExit("data.shards must name a folder of face shards (data_pipelines)")
    stage = Stage1(cfg)
    data = make_data(cfg)
    first = next(data) if cfg["train"].get("sample_every") else None
    trainer = loop.Trainer(stage.task(references=first), cfg, workdir)
    if first is not None:  # the sample references came from a fresh iterator: start the run from its beginning
        data = make_data(cfg)
    state = trainer.fit(data)
    path = stage.export(state, workdir)
    if path:
        log.info("exported the trainable params to %s", path)
    return 0


def copy_defaults() -> dict:
    return copy.deepcopy(DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
