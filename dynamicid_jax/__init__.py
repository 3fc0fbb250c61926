"""dynamicid-jax: DynamicID (and Infinite-ID) identity personalization for Stable Diffusion 1.5 in JAX/Flax.

The public entry points::

    import dynamicid_jax as dj
    unet, unet_params = dj.load_unet("sd15/unet")
    vae, vae_params = dj.load_vae("sd15/vae")
    text_encoder, text_params = dj.load_text_encoder("sd15/text_encoder")
    image_encoder, image_params = dj.load_image_encoder("clip-vit-h-14")
    tokenizer = dj.load_tokenizer()              # offline SD1.5 tokenizer
    sd = dj.StableDiffusion.from_pretrained("sd15")   # or a single-file .safetensors
    pipe = dj.DynamicIDPipeline.from_pretrained("sd15", "dynamicid/", analyzer="insightface",
                                                clip_vision_path="clip-vit-h-14")
    pipe = dj.InfiniteIDPipeline.from_pretrained("sd15", weights="infinite_id/", image_encoder="clip-vit-h-14")

The two method pipelines are imported on first use (they pull in face analysis, the method modules and the
weight importers, about 0.4 s that a plain ``import dynamicid_jax`` does not need to pay).
"""
from typing import TYPE_CHECKING, Any

from dynamicid_jax import sharding
from dynamicid_jax.models.layers import Attention, AttentionStrategy, LayerInfo, StandardAttention
from dynamicid_jax.models.clip import (CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection,
                                       clip_preprocess, load_image_encoder, load_text_encoder)
from dynamicid_jax.models.unet import UNet2DConditionModel, UNetConfig, load_unet, unet_config
from dynamicid_jax.models.vae import AutoencoderKL, load_vae
from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion
from dynamicid_jax.pipelines.stable_diffusion_xl import StableDiffusionXL  # the second backbone (docs/sdxl.md)
from dynamicid_jax.schedulers import load_scheduler
from dynamicid_jax.tokenizer import load_tokenizer, tokenize
from dynamicid_jax.weights.keymap import WeightLoadError

if TYPE_CHECKING:
    from dynamicid_jax.pipelines.dynamicid import DynamicIDPipeline
    from dynamicid_jax.pipelines.infinite_id import InfiniteIDPipeline

__version__ = "0.1.0"

# Public names imported lazily: name → module that defines it.
_LAZY = {
    "DynamicIDPipeline": "dynamicid_jax.pipelines.dynamicid",
    "InfiniteIDPipeline": "dynamicid_jax.pipelines.infinite_id",
}

__all__ = [
    "Attention", "AttentionStrategy", "AutoencoderKL", "CLIPTextModel", "CLIPTextModelWithProjection",
    "CLIPVisionModelWithProjection", "DynamicIDPipeline", "InfiniteIDPipeline", "LayerInfo", "StableDiffusion",
    "StableDiffusionXL", "StandardAttention", "UNet2DConditionModel", "UNetConfig", "WeightLoadError",
    "clip_preprocess", "load_image_encoder", "load_scheduler", "load_text_encoder", "load_tokenizer", "load_unet",
    "load_vae", "sharding", "tokenize", "unet_config",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'dynamicid_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
