"""A tiny, structurally complete SDXL in the diffusers folder format (random weights), written by diffusers'
own ``StableDiffusionXLPipeline.save_pretrained``.

SDXL's structure at test size: the UNet has SDXL's block types, transformer depths 1 / 2 / 3 (and 3 in the mid
block), linear projections and the ``text_time`` added embedding; two text encoders (a CLIPTextModel and a
CLIPTextModelWithProjection, their penultimate states concatenated to the 64-wide context, the second's
projection the 32-wide pooled embedding); SDXL's VAE settings (scaling factor 0.13025, ``force_upcast``)."""
from __future__ import annotations

import os

UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 3), cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8,
)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=1, norm_num_groups=8, sample_size=128, scaling_factor=0.13025, force_upcast=True)
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
            projection_dim=32)
TEXT_2 = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
              projection_dim=32)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
                 prediction_type="epsilon")


def make_tiny_sdxl_pipeline(seed: int = 0, noise: float = 0.05):
    """diffusers' ``StableDiffusionXLPipeline`` with tiny random components (torch, CPU, fp32)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from dynamicid_jax.tokenizer import SDXL_PAD_TOKEN, default_tokenizer_dir

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET).eval()
    vae = AutoencoderKL(**VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(**TEXT)).eval()
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)).eval()
    with torch.no_grad():  # diffusers zero-inits output layers; perturb so every path matters
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.add_(torch.randn_like(p) * noise)
    tokenizer = CLIPTokenizer.from_pretrained(str(default_tokenizer_dir()), local_files_only=True)
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(default_tokenizer_dir(pad_token=SDXL_PAD_TOKEN)),
                                                local_files_only=True)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=EulerDiscreteScheduler(**SCHEDULER))


def make_tiny_sdxl(folder: str, seed: int = 0, noise: float = 0.05):
    """Write a diffusers SDXL folder with random weights to ``folder``; returns ``(folder, torch pipeline)``."""
    pipe = make_tiny_sdxl_pipeline(seed, noise)
    pipe.save_pretrained(folder, safe_serialization=True)
    assert os.path.isdir(os.path.join(folder, "text_encoder_2"))
    return folder, pipe
