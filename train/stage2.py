"""Stage 2 (reconfiguration, docs/method.md §6.2): train the IMR and the KeyPointEncoder; everything else is frozen.

    python -m train.token_cache --config train/configs/stage2_sd15.yaml      # once: target tokens
    python -m train.stage2 --config train/configs/stage2_sd15.yaml [key.sub=value ...]
    path = train.stage2.run(cfg)   # in-process: builds the token cache when needed, trains, exports

``model.stage1`` names the stage-1 export; its metadata gives the SAA strategy (LoRA rank), the ID encoder
config and the CLIP vision folder, so they need not be repeated here. Runs resume / skip / refuse a changed
workdir as stage 1's (:func:`train.stage1.run`); the export ``{workdir}/export/stage2.safetensors`` carries the
IMR and KeyPointEncoder configs in its metadata (``python -m train.export_dynamicid`` assembles the pipeline
folder from both exports).

One identity per element: a source and ``T`` targets (with replacement). The IMR edits the source's cached ID
tokens towards each target's landmarks + face prompt; the loss is

    L = MSE(pred, tgt) + λ · MSE(ε(z_t, t, c, pred), sg(ε(z_t, t, c, tgt)))

with ``tgt`` the target's cached tokens (the stage-1 ID encoder's output for that image), ``z_t`` the noised
target latent (own ``t`` and noise per target, shared by both UNet calls), ``c`` the fixed prompt's last hidden
state, and the UNet's SAA ID branch **ungated** (w = 1). The KeyPointEncoder runs in train mode (BatchNorm over
the ``G·(1+T)`` rasters of the step; its ``batch_stats`` are the loop's mutable state).

Face prompts: the records' own (SynthFace: ``"in a happy expression, in side view"``, docs/method.md §5's automatic
format); with probability ``data.grid_prompt_fraction`` an element uses the KDEF-style grid prompts
``"the expression is happy, the face is slightly turned to the left"`` for its source and targets instead
(docs/method.md §6.2; :func:`dynamicid_jax.faces.kdef_grid.grid_face_prompt`).

Batch (``data.identities_per_step = G`` loader elements stacked): ``src_raster [G,96,96,1]``, ``tgt_rasters
[G,T,96,96,1]``, ``src_face_prompt_ids [G,77]``, ``tgt_face_prompt_ids [G,T,77]``, ``tgt_latent_moments
[G,T,h,w,8]`` or ``tgt_pixels [G,T,H,W,3]``, ``src_index [G]``, ``tgt_index [G,T]``, ``identity [G]``,
``grid_prompt [G]``, plus
``src_tokens [G,4,768]`` / ``tgt_tokens [G,T,4,768]`` looked up in the token cache on the host
(:class:`train.token_cache.TokenLookup`).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax.methods import imr as imr_lib
from dynamicid_jax.methods import saa as saa_lib
from dynamicid_jax.models.unet import UNet2DConditionModel
from dynamicid_jax.models.vae import DiagonalGaussian, vae_scale_factor
from train import loop, runs
from train.config import loader_config, stage_defaults

log = logging.getLogger(__name__)


EXPORT_FORMAT = "dynamicid-jax/stage2-export-v1"

#: the stage's defaults: train/configs/defaults/stage2.yaml + the shared sections of training.yaml
DEFAULTS: dict[str, Any] = stage_defaults("stage2")
FIXED_PROMPT: str = DEFAULTS["method"]["prompt"]  # the official recipe's one stage-2 prompt


class Stage2:
    """Builds the stage-2 :class:`~train.loop.Task` (see :data:`DEFAULTS`)."""

    def __init__(self, cfg, base: runs.BaseModel | None = None, stage1_params: dict | None = None):
        from train.token_cache import require_stage1

        self.cfg = cfg
        m = cfg["model"]
        self.dtype = runs.compute_dtype(m["dtype"])
        meta = require_stage1(m["stage1"]) if stage1_params is None or m["stage1"] else {}
        self.base = base if base is not None else runs.load_base(m["base"], self.dtype)
        b = self.base
        self.vae_factor = vae_scale_factor(b.vae.config)
        self.strategy = stage1_strategy(meta, m.get("lora_rank"))
        self.unet = UNet2DConditionModel(b.unet_config, strategy=self.strategy, dtype=self.dtype,
                                         remat_policy=m.get("remat"))
        if stage1_params is None:
            stage1_params = runs.load_params(m["stage1"])
        runs.check_tree(stage1_params["saa"], saa_lib.abstract_saa_params(b.unet_config, self.strategy),
                          "stage-1 SAA params")
        self.imr = imr_lib.IMR(imr_lib.imr_config(m["imr_variant"], **dict(m.get("imr_overrides") or {})),
                               dtype=self.dtype)
        self.kpe = imr_lib.KeyPointEncoder(imr_lib.keypoint_encoder_config(
            m["keypoint_variant"], **dict(m.get("keypoint_overrides") or {})), dtype=self.dtype)
        if self.imr.config.embedding_dim != b.unet_config.cross_attention_dim:
            raise ValueError(f"IMR embedding_dim ({self.imr.config.embedding_dim}) must equal the UNet's "
                             f"cross_attention_dim ({b.unet_config.cross_attention_dim})")
        if self.kpe.config.embedding_dim != self.imr.config.embedding_dim:
            raise ValueError(f"the KeyPointEncoder's width ({self.kpe.config.embedding_dim}) must equal the IMR's "
                             f"embedding_dim ({self.imr.config.embedding_dim}): set model.keypoint_overrides")
        # the pooled text the IMR reads: CLIP's pooled output on SD1.x, SDXL's projected pooled embedding on SDXL
        pooled_dim = (b.text_encoder_2.config.projection_dim if b.is_sdxl else b.text_encoder.config.hidden_size)
        if self.imr.config.txt_dim != pooled_dim:
            raise ValueError(f"the IMR takes {self.imr.config.txt_dim}-d pooled text but the text encoder gives "
                             f"{pooled_dim}-d (set model.imr_overrides.txt_dim)")
        self.frozen = {"unet": saa_lib.merge_params(b.params["unet"], stage1_params["saa"]),
                       "vae": b.params["vae"], "text_encoder": b.params["text_encoder"]}
        if b.is_sdxl:
            self.frozen["text_encoder_2"] = b.params["text_encoder_2"]
        from dynamicid_jax.tokenizer import tokenize

        ids = jnp.asarray(tokenize(b.tokenizer, [cfg["method"]["prompt"]]), jnp.int32)
        context, pooled = jax.jit(b.text_conditioning)(self.frozen, ids)
        self.prompt_context = np.asarray(context, np.float32)
        self.prompt_pooled = None if pooled is None else np.asarray(pooled, np.float32)  # SDXL only
        self.frozen_source = {"base": b.source, "stage1": os.path.abspath(m["stage1"]) if m["stage1"] else "",
                              "stage": "stage2"}

    def pooled_text(self, frozen, ids):
        if self.base.is_sdxl:
            return self.base.text_conditioning(frozen, ids)[1]
        return self.base.text_encoder.apply({"params": frozen["text_encoder"]}, ids).pooler_output

    def latents(self, frozen, batch, rng):
        """Target latents ``[G·T, h, w, C]`` (× scaling factor), sampled from the moments or the VAE encoding."""
        if "tgt_latent_moments" in batch:
            moments = batch["tgt_latent_moments"]
            dist = DiagonalGaussian.from_moments(moments.reshape((-1,) + moments.shape[2:]))
        elif "tgt_pixels" in batch:
            pixels = batch["tgt_pixels"]
            dist = self.base.vae.apply({"params": frozen["vae"]}, pixels.reshape((-1,) + pixels.shape[2:]),
                                       method="encode")
        else:
            raise KeyError("a stage-2 batch needs tgt_latent_moments or tgt_pixels")
        return dist.sample(rng) * self.base.scaling_factor

    def loss_fn(self, trainable, frozen, mutable, batch, rng):
        g, t_count = batch["tgt_rasters"].shape[:2]
        n = g * t_count
        k_lat, k_t, k_noise = jax.random.split(rng, 3)
        rasters = jnp.concatenate([batch["src_raster"], batch["tgt_rasters"].reshape((n,) +
                                                                                     batch["tgt_rasters"].shape[2:])])
        feats, new_vars = self.kpe.apply({"params": trainable["keypoint_encoder"], **mutable},
                                         rasters.astype(jnp.float32), train=True, mutable=["batch_stats"])
        src_lmk, tgt_lmk = feats[:g], feats[g:].reshape(g, t_count, -1)
        ids = jnp.concatenate([batch["src_face_prompt_ids"], batch["tgt_face_prompt_ids"].reshape(n, -1)])
        pooled = self.pooled_text(frozen, ids.astype(jnp.int32))
        src_txt, tgt_txt = pooled[:g], pooled[g:].reshape(g, t_count, -1)

        def one(src_tokens, s_lmk, s_txt, t_lmk, t_txt):
            return self.imr.apply({"params": trainable["imr"]}, src_tokens[None], s_lmk[None], s_txt[None], t_lmk,
                                  t_txt)

        pred = jax.vmap(one)(batch["src_tokens"], src_lmk, src_txt, tgt_lmk, tgt_txt).astype(jnp.float32)
        tgt = batch["tgt_tokens"].astype(jnp.float32)
        token_loss = jnp.mean(jnp.square(pred - tgt))

        latents = self.latents(frozen, batch, k_lat)
        sched = self.base.scheduler
        t = jax.random.randint(k_t, (n,), 0, sched.config.num_train_timesteps)
        noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
        z_t = sched.add_noise(latents, noise, t)
        c = jnp.broadcast_to(jnp.asarray(self.prompt_context, self.dtype), (n,) + self.prompt_context.shape[1:])
        f = self.vae_factor  # the image size in pixels: latent × the VAE's scale factor
        inputs = saa_lib.saa_inputs(1, (f * latents.shape[1], f * latents.shape[2]), activate_query=False)
        extra = () if self.prompt_pooled is None else self.base.added_cond(
            jnp.broadcast_to(jnp.asarray(self.prompt_pooled), (n, self.prompt_pooled.shape[1])), latents.shape[1:3])
        run = lambda tokens: self.unet.apply(  # noqa: E731
            {"params": frozen["unet"]}, z_t, t,
            saa_lib.saa_context(c, tokens.reshape((n,) + tokens.shape[2:])),
            inputs, *extra).astype(jnp.float32)
        eps_pred = run(pred)
        eps_tgt = jax.lax.stop_gradient(run(tgt))
        eps_loss = jnp.mean(jnp.square(eps_pred - eps_tgt))
        loss = token_loss + float(self.cfg["method"]["lambda_eps"]) * eps_loss
        return loss, ({"token_mse": token_loss, "eps_mse": eps_loss}, dict(new_vars))

    def init(self, rng, frozen):
        k_imr, k_kpe = jax.random.split(rng)
        kpe = imr_lib.keypoint_init_variables(self.kpe, k_kpe)
        return ({"imr": imr_lib.init_params(self.imr, k_imr), "keypoint_encoder": kpe["params"]},
                {"batch_stats": kpe["batch_stats"]})

    def abstract_trainable(self):
        kpe = imr_lib.keypoint_abstract_variables(self.kpe)
        return {"imr": imr_lib.abstract_params(self.imr), "keypoint_encoder": kpe["params"]}

    def abstract_mutable(self):
        return {"batch_stats": imr_lib.keypoint_abstract_variables(self.kpe)["batch_stats"]}

    def abstract_frozen(self):
        from dynamicid_jax.models import vae as vae_lib
        from train.stage1 import abstract_unet

        unet_abs = saa_lib.merge_params(abstract_unet(self.base.unet_config),
                                        saa_lib.abstract_saa_params(self.base.unet_config, self.strategy))
        out = {"unet": unet_abs, "vae": vae_lib.abstract_params(self.base.vae),
               "text_encoder": runs.boxed_abstract(self.base.text_encoder, jnp.zeros((1, 77), jnp.int32))}
        if self.base.is_sdxl:
            out["text_encoder_2"] = runs.boxed_abstract(self.base.text_encoder_2, jnp.zeros((1, 77), jnp.int32))
        return out

    def task(self) -> loop.Task:
        return loop.Task.of(self, abstract_mutable=self.abstract_mutable(), batch_shardings=batch_shardings)


    def export(self, state: loop.TrainState, workdir: str, *, fingerprint: str = "") -> str | None:
        """``{workdir}/export/stage2.safetensors``: ``imr/…``, ``keypoint_encoder/…`` and ``batch_stats/…``, with
        the IMR / KeyPointEncoder configs in the metadata."""
        params = loop.replicated_to_host({**(state.ema if state.ema is not None else state.trainable),
                                          **state.mutable})
        if jax.process_index() != 0:
            return None
        m = self.cfg["model"]
        meta = {"format": EXPORT_FORMAT, "step": str(int(loop.host_value(state.step))), "fingerprint": fingerprint,
                "stage1": os.path.abspath(m["stage1"]) if m["stage1"] else "", "base": self.base.source,
                "imr_config": json.dumps(self.imr.config.to_dict()),
                "keypoint_encoder_config": json.dumps(self.kpe.config.to_dict())}
        return runs.save_params(params, os.path.join(workdir, "export", "stage2.safetensors"), metadata=meta)


def stage1_strategy(meta: dict, lora_rank: int | None) -> saa_lib.SAA:
    """The SAA strategy stage 1 trained (its export's metadata); ``lora_rank`` must agree when given."""
    if meta.get("saa"):
        strategy = saa_lib.SAA(**json.loads(meta["saa"]))
        if lora_rank is not None and int(lora_rank) != strategy.lora_rank:
            raise ValueError(f"model.lora_rank={lora_rank} but the stage-1 export was trained with LoRA rank "
                             f"{strategy.lora_rank} (leave model.lora_rank unset to follow it)")
        return strategy
    return saa_lib.SAA(lora_rank=int(lora_rank) if lora_rank is not None else 128)


def batch_shardings(mesh, batch):
    """Split the identities (leading axis ``G``) over data×fsdp when they divide; otherwise (one process, e.g.
    the official G = 1) split the ``T`` targets (axis 1) of the per-target leaves and replicate the rest."""
    from jax.sharding import NamedSharding, PartitionSpec

    from dynamicid_jax import sharding as sh

    axes = tuple(a for a in sh.BATCH_AXES if a in mesh.axis_names)
    split = int(np.prod([mesh.shape[a] for a in axes]))
    g, t_count = np.shape(batch["tgt_rasters"])[:2]
    if g % split == 0:
        return loop.default_batch_shardings(mesh, batch)
    if jax.process_count() > 1:
        raise ValueError(f"data.identities_per_step ({g} per process) × processes must divide by data×fsdp "
                         f"({split}) on several processes")
    if t_count % split:
        raise ValueError(f"neither identities per step ({g}) nor targets ({t_count}) divide by data×fsdp ({split})")

    def one(key, x):
        shape = np.shape(x)
        if key.startswith("tgt_") and len(shape) >= 2 and shape[1] == t_count:
            return NamedSharding(mesh, PartitionSpec(None, axes, *([None] * (len(shape) - 2))))
        return sh.replicated(mesh)

    return {k: one(k, v) for k, v in batch.items()}


def make_data(cfg, cache_path: str | None = None):
    """Stage-2 loader elements, ``identities_per_step`` stacked, with cached tokens attached (Grain, checkpointable)."""
    from data_pipelines import loaders
    from train.token_cache import TokenCache, TokenLookup

    d = cfg["data"]
    if not d["shards"]:
        raise ValueError("data.shards must name a folder of face shards (data_pipelines)")
    cache_path = cache_path or cfg["token_cache"]["path"]
    if not cache_path:
        raise ValueError("token_cache.path must name the cache built by python -m train.token_cache")
    conf = loader_config(loaders.Stage2Config, {**d, "clip_size": int(d["clip_size"]) or 224},
                                num_targets=int(d["num_targets"]),
                                grid_prompt_fraction=float(d["grid_prompt_fraction"]))
    ds = loaders.stage2_loader(d["shards"], conf).batch(int(d["identities_per_step"]), drop_remainder=True)
    return iter(ds.map(TokenLookup(TokenCache.load(cache_path))))


def run(config: Any = None, overrides: Sequence[str] = (), *, workdir: str | None = None, mesh=None,
        base: runs.BaseModel | None = None) -> str:
    """Build the token cache if needed, then train stage 2 (or resume, or skip when finished:
    :func:`train.runs.run_stage`) → the export's path."""
    from train import token_cache

    def embed_dim(cfg) -> int:
        meta = token_cache.require_stage1(cfg["model"]["stage1"])
        return token_cache.stage1_id_encoder_config(cfg, meta).id_embed_dim

    def inputs(cfg) -> dict[str, str]:
        m = cfg["model"]
        meta = token_cache.require_stage1(m["stage1"])
        return {"base": m["base"] if base is None else base.source, "shards": cfg["data"]["shards"],
                "stage1": m["stage1"], "image_encoder": token_cache.stage1_image_encoder(cfg, meta)}

    def train(cfg, workdir: str, fingerprint: str) -> str:
        cache = token_cache.run(cfg, workdir=workdir)
        stage = Stage2(cfg, base=base)
        trainer = loop.Trainer(stage.task(), cfg, workdir, mesh=mesh)
        state = trainer.fit(make_data(cfg, cache))
        return stage.export(state, workdir, fingerprint=fingerprint) or os.path.join(workdir, EXPORT)

    return runs.run_stage(runs.StageRun("stage 2", DEFAULTS, EXPORT, embed_dim, inputs, train,
                                        owned=(*runs.OWNED, "token_cache")), config, overrides, workdir=workdir)


#: the export's path inside the workdir
EXPORT = os.path.join("export", "stage2.safetensors")


def main(argv=None) -> int:
    return runs.stage_main(__doc__, run, argv)


if __name__ == "__main__":
    from dynamicid_jax.errors import run_cli

    raise SystemExit(run_cli(main))
