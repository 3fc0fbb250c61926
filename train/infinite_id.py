"""Infinite-ID identity-enhanced training (docs/method.md §6.3): face mapper + CLIP mapper + ``to_k_id``/``to_v_id``.

    python -m train.infinite_id --config my_infinite_id.yaml --workdir runs/iid [key.sub=value ...]
    folder = train.infinite_id.run("train/configs/synthface_infinite_id.yaml", [...])   # in-process

The cross-attention runs in "ID only" mode: the text branch is not computed, no prompt is encoded, and the loss
is ε-MSE conditioned on the ID tokens alone (:func:`dynamicid_jax.methods.infinite_id.infinite_id_loss`).
Frozen: the UNet base, the VAE (used only for ``target_pixels`` batches) and the CLIP image encoder (used only
for ``ref_clip_pixels`` batches). ID dropout (``method.drop_id``) swaps in the null tokens, ``encoder(0,
CLIP(grey))``, so that inference can use CFG. The ID projections start as copies of the text ``to_k``/``to_v``.
At the end, ``{workdir}/export/`` holds ``infinite_id.safetensors`` + ``infinite_id.json``, the folder that
:class:`~dynamicid_jax.pipelines.infinite_id.InfiniteIDPipeline` loads, plus ``image_encoder/`` when the CLIP
tower is a ``random:`` one (the pipeline's ``image_encoder`` argument; :func:`run` returns the export folder and
``train.json`` there records the step and the run's fingerprint). Runs resume / skip / refuse a changed workdir as
stage 1's (:func:`train.stage1.run`).

Data: the stage-1 loader (``data_pipelines.loaders.stage1_loader``; its ``input_ids`` are ignored). Its CLIP
input is the whole reference image, so the exported config says ``clip_input: image``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax.methods import infinite_id as iid
from dynamicid_jax.methods.infinite_id_weights import load_infinite_id, save_infinite_id
from dynamicid_jax.models.unet import UNet2DConditionModel
from dynamicid_jax.models.vae import DiagonalGaussian, vae_scale_factor
from train import loop, runs
from train.config import stage_defaults

log = logging.getLogger(__name__)

#: the stage's defaults: train/configs/defaults/infinite_id.yaml + the shared sections of training.yaml
DEFAULTS: dict[str, Any] = stage_defaults("infinite_id")


class InfiniteIDStage:
    """Builds the Infinite-ID :class:`~train.loop.Task` from a config (see :data:`DEFAULTS`)."""

    def __init__(self, cfg, base: runs.BaseModel | None = None, image_encoder: tuple | None = None):
        self.cfg = cfg
        m = cfg["model"]
        self.dtype = runs.compute_dtype(m["dtype"])
        self.base = base if base is not None else runs.load_base(m["base"], self.dtype)
        overrides = {"clip_input": "image", **dict(m.get("encoder_overrides") or {})}
        self.enc_cfg = iid.infinite_id_encoder_config(m["encoder_variant"], **overrides)
        unet_cfg = self.base.unet_config
        if self.enc_cfg.dim != unet_cfg.cross_attention_dim:
            raise ValueError(f"the Infinite-ID encoder's width ({self.enc_cfg.dim}) must equal the UNet's "
                             f"cross_attention_dim ({unet_cfg.cross_attention_dim})")
        self.encoder = iid.InfiniteIDEncoder(self.enc_cfg, dtype=self.dtype)
        self.unet = UNet2DConditionModel(unet_cfg, strategy=iid.InfiniteIDAttention(), dtype=self.dtype,
                                         remat_policy=m.get("remat"))
        self.image_module, image_params, image_source = (image_encoder if image_encoder is not None else
                                                         runs.load_image_encoder(m["image_encoder"], self.dtype))
        if self.image_module is not None and self.image_module.config.hidden_size != self.enc_cfg.clip_dim:
            raise ValueError(f"the Infinite-ID encoder takes {self.enc_cfg.clip_dim}-wide CLIP features but the image "
                             f"encoder {m['image_encoder']!r} is {self.image_module.config.hidden_size} wide (set "
                             f"model.encoder_overrides.clip_dim)")
        from train.stage1 import resolve_clip_size

        self.vae_factor = vae_scale_factor(self.base.vae.config)
        self.clip_size = resolve_clip_size(cfg["data"], self.image_module)
        self.image_params, self.image_source = image_params, image_source
        null = self._null_clip_features(m, image_params)
        if null is None:
            raise ValueError("ID dropout needs the CLIP features of the grey image: give model.image_encoder or "
                             "model.uncond_clip_features")
        self.frozen = {"unet": self.base.params["unet"], "vae": self.base.params["vae"], "null_clip_features": null}
        if self.image_module is not None:
            self.frozen["image_encoder"] = image_params
        self.frozen_source = {"base": self.base.source, "image_encoder": image_source, "stage": "infinite_id"}

    def _clip(self, module, params, pixels):
        return module.apply({"params": params}, pixels).hidden_states[self.enc_cfg.clip_layer]

    def _null_clip_features(self, m, image_params) -> np.ndarray | None:
        if self.image_module is not None:
            size = self.image_module.config.image_size
            feats = jax.jit(self._clip, static_argnums=0)(self.image_module, image_params,
                                                          jnp.zeros((1, size, size, 3), jnp.float32))
            return np.asarray(feats, np.float32)
        if m.get("uncond_clip_features"):
            return np.load(m["uncond_clip_features"]).astype(np.float32)
        return None

    # ---- the task -------------------------------------------------------------------------------------------
    def loss_batch(self, frozen, batch, rng) -> dict:
        """The loader's batch → :func:`infinite_id_loss`'s (latents sampled here, CLIP features computed)."""
        if "target_latent_moments" in batch:
            dist = DiagonalGaussian.from_moments(batch["target_latent_moments"])
        elif "target_pixels" in batch:
            dist = self.base.vae.apply({"params": frozen["vae"]}, batch["target_pixels"], method="encode")
        else:
            raise KeyError("an Infinite-ID batch needs target_latent_moments or target_pixels")
        if "ref_clip_features" in batch:
            feats = batch["ref_clip_features"].astype(jnp.float32)
        elif "ref_clip_pixels" in batch:
            if self.image_module is None:
                raise ValueError("batches with ref_clip_pixels need model.image_encoder")
            feats = self._clip(self.image_module, frozen["image_encoder"], batch["ref_clip_pixels"])
        else:
            raise KeyError("an Infinite-ID batch needs ref_clip_pixels or ref_clip_features")
        return {"latents": dist.sample(rng) * self.base.scaling_factor,
                "id_embeds": batch["ref_id_embedding"].astype(jnp.float32), "clip_features": feats.astype(jnp.float32)}

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        k_lat, k_loss = jax.random.split(rng)
        loss, aux = iid.infinite_id_loss(trainable, frozen, self.loss_batch(frozen, batch, k_lat), k_loss,
                                         unet=self.unet, encoder=self.encoder, scheduler=self.base.scheduler,
                                         id_dropout=float(self.cfg["method"]["drop_id"]),
                                         vae_scale_factor=self.vae_factor)
        return loss, ({"id_dropped": aux["id_dropped"]}, mutable)

    def init(self, rng, frozen):
        m = self.cfg["model"]
        unet_cfg = self.base.unet_config
        if m.get("init_from"):
            enc_cfg, enc, ids = load_infinite_id(m["init_from"], unet_cfg)
            if enc_cfg != self.enc_cfg:
                raise ValueError(f"model.init_from holds an encoder with config {enc_cfg}, expected {self.enc_cfg}")
            return {"encoder": enc, "id_projections": ids}, {}
        k_enc, k_ids = jax.random.split(rng)
        enc = iid.init_encoder_params(self.enc_cfg, k_enc)
        ids = iid.init_id_from_base(frozen["unet"], iid.init_id_params(unet_cfg, k_ids))
        return {"encoder": enc, "id_projections": ids}, {}

    def abstract_trainable(self):
        return {"encoder": iid.abstract_encoder_params(self.enc_cfg),
                "id_projections": iid.abstract_id_params(self.base.unet_config)}

    def abstract_frozen(self):
        from dynamicid_jax.models import vae as vae_lib
        from train.stage1 import abstract_unet

        out = {"unet": abstract_unet(self.base.unet_config),
               "vae": vae_lib.abstract_params(self.base.vae),
               "null_clip_features": jax.ShapeDtypeStruct(self.frozen["null_clip_features"].shape, jnp.float32)}
        if self.image_module is not None:
            size = self.image_module.config.image_size
            out["image_encoder"] = runs.boxed_abstract(self.image_module, jnp.zeros((1, size, size, 3)))
        return out

    def sample_fn(self, references: dict):
        """Sample grid of what the objective trains: the UNet conditioned on the first reference's ID tokens only
        (no text), CFG against the null tokens, ``sample.count`` seeds."""
        from dynamicid_jax.models.vae import decode_latents
        from dynamicid_jax.pipelines.sampling import denoise, to_uint8

        s = self.cfg["sample"]
        n, size, f = int(s["count"]), int(s["size"]), self.vae_factor
        multiple = f * 2 ** (len(self.base.unet_config.block_out_channels) - 1)  # VAE factor × UNet downsampling
        if size <= 0 or size % multiple:
            raise ValueError(f"sample.size must be a positive multiple of {multiple}, got {size}")
        ref = {k: jnp.asarray(v[:1]) for k, v in references.items()
               if k in ("ref_id_embedding", "ref_clip_features", "ref_clip_pixels")}

        def sample(trainable, frozen, mutable):
            if "ref_clip_features" in ref:
                feats = ref["ref_clip_features"].astype(jnp.float32)
            else:
                feats = self._clip(self.image_module, frozen["image_encoder"], ref["ref_clip_pixels"])
            enc = trainable["encoder"]
            tokens = self.encoder.apply({"params": enc}, ref["ref_id_embedding"].astype(jnp.float32), feats)
            null = iid.null_id_tokens(self.encoder, enc, frozen["null_clip_features"])
            shape = (n, size // f, size // f, self.base.unet_config.in_channels)
            latents = jax.random.normal(jax.random.key(0), shape, jnp.float32)
            added = {}
            if self.base.is_sdxl:  # no text: the zero pooled embedding, the sample size's micro-conditioning
                cond = self.base.added_cond(jnp.zeros((n, self.base.unet_config.pooled_text_dim)), shape[1:3])[0]
                added = {"added_cond": cond, "uncond_added_cond": cond}
            out = denoise(self.unet, iid.merge_id_params(frozen["unet"], trainable["id_projections"]),
                          self.base.scheduler, int(s["steps"]), latents, jnp.repeat(tokens, n, 0),
                          float(s["guidance_scale"]), attention_inputs=iid.id_only_inputs(self.enc_cfg.num_tokens),
                          uncond_context=jnp.repeat(null, n, 0), **added)
            return to_uint8(decode_latents(self.base.vae, frozen["vae"], out))

        return sample

    def task(self, references: dict | None = None) -> loop.Task:
        return loop.Task.of(self, sample_fn=self.sample_fn(references) if references is not None else None)

    def export(self, state: loop.TrainState, workdir: str, *, fingerprint: str = "") -> str | None:
        """Write the pipeline-ready folder ``{workdir}/export`` (EMA params if kept; process 0): the weights, the
        image encoder it was trained with as ``image_encoder/`` (a ``random:`` one, or a copy of the folder, so the
        export is self-contained), and ``train.json`` (step, fingerprint, image encoder) last. Returns the weights'
        path."""
        params = loop.replicated_to_host(state.ema if state.ema is not None else state.trainable)
        if jax.process_index() != 0:
            return None
        folder = os.path.join(workdir, "export")
        record = os.path.join(folder, TRAIN_RECORD)
        if os.path.exists(record):
            os.remove(record)
        path = save_infinite_id(folder, self.enc_cfg, params["encoder"], params["id_projections"],
                                self.base.unet_config)
        image_encoder = self.image_source
        if self.image_module is not None:
            from dynamicid_jax.models.clip import save_image_encoder

            saved = save_image_encoder(os.path.join(folder, "image_encoder"), self.image_module, self.image_params)
            if self.image_source.startswith("random:"):
                image_encoder = saved
        from dynamicid_jax.file_io import write_json

        write_json({"step": int(loop.host_value(state.step)), "fingerprint": fingerprint,
                    "image_encoder": image_encoder, "base": self.base.source}, record)
        return path


TRAIN_RECORD = "train.json"


def run(config: Any = None, overrides: Sequence[str] = (), *, workdir: str | None = None, mesh=None,
        base: runs.BaseModel | None = None, image_encoder: tuple | None = None) -> str:
    """Train Infinite-ID (or resume, or skip when finished: :func:`train.runs.run_stage`) → the export folder
    (``InfiniteIDPipeline.from_pretrained(sd, folder, folder + "/image_encoder", ...)`` for ``random:`` CLIP)."""
    from train.stage1 import make_data

    def embed_dim(cfg) -> int:
        m = cfg["model"]
        return iid.infinite_id_encoder_config(m["encoder_variant"], **{"clip_input": "image",
                                                                       **dict(m.get("encoder_overrides") or {})}
                                              ).id_embed_dim

    def inputs(cfg) -> dict[str, str]:
        m = cfg["model"]
        return {"base": m["base"] if base is None else base.source, "shards": cfg["data"]["shards"],
                "image_encoder": m["image_encoder"], "init_from": m["init_from"],
                "uncond_clip_features": m["uncond_clip_features"]}

    def done(folder: str, fingerprint: str, steps: int) -> bool:  # the export is a folder with a train record
        record = os.path.join(folder, TRAIN_RECORD)
        if not os.path.isfile(record):
            return False
        with open(record) as f:
            finished = json.load(f)
        return finished.get("fingerprint") == fingerprint and finished.get("step") == steps

    def train(cfg, workdir: str, fingerprint: str) -> str:
        stage = InfiniteIDStage(cfg, base=base, image_encoder=image_encoder)
        references = next(make_data(cfg, stage.clip_size)) if cfg["train"].get("sample_every") else None
        trainer = loop.Trainer(stage.task(references=references), cfg, workdir, mesh=mesh)
        stage.export(trainer.fit(make_data(cfg, stage.clip_size)), workdir, fingerprint=fingerprint)
        return os.path.join(workdir, "export")

    return runs.run_stage(runs.StageRun("Infinite-ID", DEFAULTS, "export", embed_dim, inputs, train, done=done),
                          config, overrides, workdir=workdir)


def main(argv=None) -> int:
    return runs.stage_main(__doc__, run, argv)


if __name__ == "__main__":
    from dynamicid_jax.errors import run_cli

    raise SystemExit(run_cli(main))
