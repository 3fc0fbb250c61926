"""The built-in component configs of Stable Diffusion 1.5 and SDXL base 1.0, in diffusers / transformers
``config.json`` form.

A single-file checkpoint carries weights but no configs; these are the configs its components get unless the
caller gives others (``weights.single_file`` for SD1.x, ``weights.single_file_sdxl`` for SDXL; docs/weights.md).
They are also what the random-weight writers of the tests and benchmarks build their full-size models from.
"""
from __future__ import annotations

import copy
from typing import Any

__all__ = ["SD15_UNET_CONFIG", "SD15_VAE_CONFIG", "SD15_TEXT_ENCODER_CONFIG", "SD15_SCHEDULER_CONFIG", "sd15_configs",
           "SDXL_UNET_CONFIG", "SDXL_VAE_CONFIG", "SDXL_TEXT_ENCODER_CONFIG", "SDXL_TEXT_ENCODER_2_CONFIG",
           "SDXL_SCHEDULER_CONFIG", "sdxl_configs"]

# --------------------------------------------------------------------------------------------------------
# Built-in SD1.5 configs (diffusers / transformers config.json form)
# --------------------------------------------------------------------------------------------------------
SD15_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD15_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}



def sd15_configs() -> dict[str, dict[str, Any]]:
    """Fresh copies of the SD1.5 component configs: ``{"unet", "vae", "text_encoder", "scheduler"}``."""
    return {"unet": copy.deepcopy(SD15_UNET_CONFIG), "vae": copy.deepcopy(SD15_VAE_CONFIG),
            "text_encoder": copy.deepcopy(SD15_TEXT_ENCODER_CONFIG),
            "scheduler": copy.deepcopy(SD15_SCHEDULER_CONFIG)}


# --------------------------------------------------------------------------------------------------------
# Built-in SDXL base 1.0 configs (diffusers / transformers config.json form)
# --------------------------------------------------------------------------------------------------------
SDXL_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

# SDXL's VAE: SD1.5's architecture, its own weights and scaling factor. ``force_upcast`` tells fp16 users to
# decode in fp32 (the original weights overflow in fp16).
SDXL_VAE_CONFIG: dict[str, Any] = {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025,
                                   "force_upcast": True}

SDXL_TEXT_ENCODER_CONFIG: dict[str, Any] = {**SD15_TEXT_ENCODER_CONFIG}

SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModelWithProjection"],
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def sdxl_configs() -> dict[str, dict[str, Any]]:
    """Fresh copies of the SDXL base 1.0 component configs: ``{"unet", "vae", "text_encoder",
    "text_encoder_2", "scheduler"}``."""
    return {"unet": copy.deepcopy(SDXL_UNET_CONFIG), "vae": copy.deepcopy(SDXL_VAE_CONFIG),
            "text_encoder": copy.deepcopy(SDXL_TEXT_ENCODER_CONFIG),
            "text_encoder_2": copy.deepcopy(SDXL_TEXT_ENCODER_2_CONFIG),
            "scheduler": copy.deepcopy(SDXL_SCHEDULER_CONFIG)}
