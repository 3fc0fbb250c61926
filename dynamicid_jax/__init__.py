"""dynamicid-jax: DynamicID (and Infinite-ID) identity personalization for Stable Diffusion 1.5 in JAX/Flax.

The public entry points::

    import dynamicid_jax as dj
    unet, unet_params = dj.load_unet("sd15/unet")
    vae, vae_params = dj.load_vae("sd15/vae")
    text_encoder, text_params = dj.load_text_encoder("sd15/text_encoder")
    image_encoder, image_params = dj.load_image_encoder("clip-vit-h-14")
    tokenizer = dj.load_tokenizer()              # offline SD1.5 tokenizer
    sd = dj.StableDiffusion.from_pretrained("sd15")   # or a single-file .safetensors
"""
from dynamicid_jax import sharding
from dynamicid_jax.models.attention import Attention, AttentionStrategy, LayerInfo, StandardAttention
from dynamicid_jax.models.clip import (CLIPTextModel, CLIPVisionModelWithProjection, clip_preprocess,
                                       load_image_encoder, load_text_encoder)
from dynamicid_jax.models.unet import UNet2DConditionModel, UNetConfig, load_unet, unet_config
from dynamicid_jax.models.vae import AutoencoderKL, load_vae
from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion
from dynamicid_jax.schedulers import load_scheduler
from dynamicid_jax.tokenizer import load_tokenizer, tokenize
from dynamicid_jax.weights.keymap import WeightLoadError

__version__ = "0.1.0"

__all__ = [
    "Attention", "AttentionStrategy", "AutoencoderKL", "CLIPTextModel", "CLIPVisionModelWithProjection",
    "LayerInfo", "StableDiffusion", "StandardAttention", "UNet2DConditionModel", "UNetConfig", "WeightLoadError",
    "clip_preprocess", "load_image_encoder", "load_scheduler", "load_text_encoder", "load_tokenizer", "load_unet",
    "load_vae", "sharding", "tokenize", "unet_config",
]

# SDXL, the second backbone (docs/sdxl.md)
from dynamicid_jax.models.clip import CLIPTextModelWithProjection  # noqa: E402
from dynamicid_jax.pipelines.stable_diffusion_xl import StableDiffusionXL  # noqa: E402

__all__ += ["CLIPTextModelWithProjection", "StableDiffusionXL"]
