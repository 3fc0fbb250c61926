"""A tiny, structurally complete Stable Diffusion in the diffusers folder format (random weights).

Shared by the pipeline, CLI and method tests: the real file formats, with widths small enough for a CPU; and a
tiny CLIP vision tower in transformers' format."""
from __future__ import annotations

import json
import os
import shutil

UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=1, norm_num_groups=8, sample_size=64)
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
#: a tiny CLIP vision tower (the DynamicID pipeline's and the converter's tests share it, and so their compiles)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=32)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon")


def make_tiny_sd(folder: str, seed: int = 0, noise: float = 0.05) -> str:
    """Write a diffusers SD folder with random weights to ``folder``; returns it."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dynamicid_jax.tokenizer import default_tokenizer_dir

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET).eval()
    vae = AutoencoderKL(**VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(**TEXT)).eval()
    with torch.no_grad():  # diffusers zero-inits output layers; perturb so every path matters
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.add_(torch.randn_like(p) * noise)
    unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
    text.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
    shutil.copytree(default_tokenizer_dir(), os.path.join(folder, "tokenizer"))  # vocab.json + merges.txt, as SD1.5
    PNDMScheduler(**SCHEDULER).save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
                   "safety_checker": [None, None], "feature_extractor": [None, None]}, f)
    return folder


def make_tiny_clip_vision(folder, seed: int = 3) -> str:
    """A tiny random ``CLIPVisionModelWithProjection`` (``VISION``) saved by transformers (the real folder format)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).eval().save_pretrained(folder, safe_serialization=True)
    return str(folder)
