"""The models a training stage builds on: the frozen base (:func:`load_base` → :class:`BaseModel`) and image
encoder, compute dtypes, abstract (boxed, logical-axis) param trees for shardings, and the trainable params'
files (:func:`save_params` / :func:`load_params`, checked with :func:`check_tree`)."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

log = logging.getLogger(__name__)

__all__ = ["DTYPES", "BaseModel", "boxed_abstract", "check_tree", "clip_penultimate", "compute_dtype", "load_base",
           "load_image_encoder", "load_params", "save_params"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def boxed_abstract(module: nn.Module, *args: Any, collection: str = "params", **kwargs: Any) -> Any:
    """``jax.eval_shape(module.init)`` — the boxed (logical axes) abstract tree of one collection."""
    return jax.eval_shape(lambda r: module.init(r, *args, **kwargs), jax.random.key(0)).get(collection, {})


@dataclasses.dataclass
class BaseModel:
    """The frozen Stable Diffusion parts of a stage: modules, params and facts the losses need."""

    unet_config: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    params: dict  # {"unet", "vae", "text_encoder"} (+ "text_encoder_2" for SDXL)
    scaling_factor: float
    source: str
    text_encoder_2: Any = None  # SDXL only: the CLIPTextModelWithProjection

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def text_conditioning(self, params: Mapping, ids: jax.Array,
                          ids_2: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """``(context [B, 77, D], pooled [B, P] or None)`` of token ids. SDXL: ``ids_2`` are tokenizer 2's; without
        them they are derived from tokenizer 1's (exact unless a prompt contains "!": see ``tokenizer_2_ids``).
        ``params`` holds the text encoders' params under their component names."""
        if not self.is_sdxl:
            return self.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state, None
        from dynamicid_jax.pipelines.stable_diffusion_xl import encode_sdxl_text

        return encode_sdxl_text(self.text_encoder, self.text_encoder_2, params, ids, ids_2)

    def added_cond(self, pooled: jax.Array | None, latent_hw: tuple[int, int]) -> tuple:
        """The UNet's extra positional argument: ``()`` for SD1.x, ``(added_cond,)`` for SDXL (pooled text and
        the micro-conditioning of an uncropped image at the latent's size)."""
        if not self.is_sdxl:
            return ()
        from dynamicid_jax.models.unet import micro_conditioning
        from dynamicid_jax.models.vae import vae_scale_factor

        return ({"text_embeds": pooled, "time_ids": micro_conditioning(pooled.shape[0], latent_hw,
                                                                       vae_scale_factor(self.vae.config))},)


def load_base(path: str, dtype) -> BaseModel:
    """SD1.5 or SDXL (picked from the folder / file) from a diffusers folder or a single ``.safetensors`` file
    (params fp32, modules at ``dtype``; DDIM scheduler)."""
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion
    from dynamicid_jax.pipelines.stable_diffusion_xl import StableDiffusionXL
    from dynamicid_jax.weights.folders import is_sdxl

    if not path:
        raise ValueError("model.base must name a Stable Diffusion 1.5 or SDXL diffusers folder or .safetensors file")
    if is_sdxl(path):
        xl = StableDiffusionXL.from_pretrained(path, dtype=dtype, scheduler="ddim")
        return BaseModel(unet_config=xl.unet.config, vae=xl.vae, text_encoder=xl.text_encoder,
                         tokenizer=xl.tokenizer, scheduler=xl.scheduler, params=dict(xl.params),
                         scaling_factor=float(xl.vae.config.scaling_factor), source=os.path.abspath(path),
                         text_encoder_2=xl.text_encoder_2)
    sd = StableDiffusion.from_pretrained(path, dtype=dtype)
    return BaseModel(unet_config=sd.unet.config, vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                     scheduler=sd.scheduler, params=dict(sd.params), scaling_factor=float(sd.vae.config.scaling_factor),
                     source=os.path.abspath(path))


def load_image_encoder(spec: str, dtype, seed: int = 0):
    """``(module, params, source)`` for a CLIP vision folder, or ``"random:<variant>"`` (random weights: tests,
    SynthFace); ``""`` → ``(None, None, "")``."""
    from dynamicid_jax.models import clip

    if not spec:
        return None, None, ""
    if spec.startswith("random:"):
        module = clip.CLIPVisionModelWithProjection(clip.vision_config(spec.split(":", 1)[1]), dtype=dtype)
        size = module.config.image_size
        params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(seed + 7), jnp.zeros((1, size, size, 3)))
                               )["params"]
        return module, params, spec
    module, params = clip.load_image_encoder(spec, dtype=dtype)
    return module, params, os.path.abspath(spec)


def clip_penultimate(module, params, pixels: jax.Array) -> jax.Array:
    """CLIP vision penultimate hidden states ``[B, L, C]`` (the ID encoder's input)."""
    return module.apply({"params": params}, pixels).hidden_states[-2]


# ---------------------------------------------------------------------------------------------------------
# Trainable params on disk (between stages): flat safetensors with "/"-joined Flax paths
# ---------------------------------------------------------------------------------------------------------
def save_params(params: Mapping, path: str, metadata: dict[str, str] | None = None) -> str:
    from dynamicid_jax.weights.keymap import write_safetensors

    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(
        jax.device_get(dict(params))).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_safetensors(flat, path, metadata=metadata)
    return path


def load_params(path: str) -> dict:
    from dynamicid_jax.weights.keymap import read_safetensors

    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in read_safetensors(path).items()})


def check_tree(params: Mapping, abstract: Any, what: str) -> None:
    """``params`` must have exactly the paths and shapes of ``abstract`` (boxed or not)."""
    from dynamicid_jax.sharding import _unbox

    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(_unbox(dict(abstract))).items()}
    have = {"/".join(k): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(params)).items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    bad = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or bad:
        raise ValueError(f"{what}: missing {missing[:5]}, unexpected {extra[:5]}, wrong shapes "
                         f"{[(k, have[k], want[k]) for k in bad[:5]]}")
