"""Tiny models and reference photos for the web-app tests (tests/test_app.py).

The app serves a random tiny Stable Diffusion (tests/tiny_sd.py) with random DynamicID weights (IMR included), a tiny
CLIP vision tower and dlib (real weights) on two faces cropped from ``t1.jpg``, the group photo that ships with
insightface — the same world as tests/test_dynamicid_pipeline.py, built directly (seconds), not by the demo."""
from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np

#: (y0, x0, y1, x1) of two people in t1.jpg
CROPS = ((218, 0, 451, 231), (222, 374, 499, 651))
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=32)


def group_photo() -> np.ndarray | None:
    """insightface's t1.jpg (six people) as RGB, or None when insightface is not installed."""
    from dynamicid_jax import faces as F

    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        return None
    return F.load_rgb(os.path.join(list(spec.submodule_search_locations)[0], "data", "images", "t1.jpg"))


def write_references(folder: str) -> dict[str, str]:
    """PNG files to upload: ``person_1``, ``person_2`` (one face each), ``no_face`` (flat grey), ``group`` (six
    faces). Returns name → path."""
    from PIL import Image

    photo = group_photo()
    os.makedirs(folder, exist_ok=True)
    images = {f"person_{i + 1}": photo[y0:y1, x0:x1] for i, (y0, x0, y1, x1) in enumerate(CROPS)}
    images["no_face"] = np.full((160, 160, 3), 128, np.uint8)
    images["group"] = photo
    paths = {}
    for name, image in images.items():
        paths[name] = os.path.join(folder, f"{name}.png")
        Image.fromarray(np.ascontiguousarray(image)).save(paths[name])
    return paths


def build_tiny_models(folder: str, tiny_sd_dir: str) -> dict[str, str]:
    """Random DynamicID weights (untrained LoRA, random ID projections, encoder, IMR, KeyPointEncoder) for the tiny
    SD, converted-folder format, plus a tiny CLIP vision tower. Returns ``{"sd", "dynamicid", "clip_vision"}``."""
    import jax
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from dynamicid_jax.methods import id_encoder as ide
    from dynamicid_jax.methods import imr
    from dynamicid_jax.methods import saa as S
    from dynamicid_jax.models.unet import UNetConfig
    from dynamicid_jax.pipelines.dynamicid import DynamicIDWeights, save_dynamicid
    from dynamicid_jax.weights import keymap as km

    enc = ide.id_encoder_config("tiny", id_embed_dim=128, clip_dim=VISION["hidden_size"])  # dlib: 128-d
    imr_cfg, kpe_cfg = imr.imr_config("tiny"), imr.keypoint_encoder_config("tiny")
    strategy = S.SAA(lora_rank=4)
    unet_config = UNetConfig.from_dict(km.read_config(km.find_component(tiny_sd_dir, "unet")))
    weights = DynamicIDWeights(enc, ide.init_params(ide.IDEncoder(enc), jax.random.key(1)), strategy, unet_config,
                               S.init_saa_params(unet_config, jax.random.key(2), strategy), imr_cfg,
                               imr.init_params(imr.IMR(imr_cfg), jax.random.key(3)), kpe_cfg,
                               imr.keypoint_init_variables(imr.KeyPointEncoder(kpe_cfg), jax.random.key(4)))
    dynamicid = save_dynamicid(os.path.join(folder, "dynamicid"), weights)
    torch.manual_seed(3)
    clip = os.path.join(folder, "clip_vision")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).eval().save_pretrained(clip, safe_serialization=True)
    return {"sd": tiny_sd_dir, "dynamicid": dynamicid, "clip_vision": clip}


def load_engine(paths: dict[str, str], *, max_queue: int):
    from infer.app_engine import Engine
    from infer.app_models import ModelSpec, load_models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = load_models(ModelSpec(sd=paths["sd"], dynamicid=paths["dynamicid"],
                                       clip_vision=paths["clip_vision"], analyzer="dlib",
                                       description="tiny random test models"))
    return Engine(models, max_queue=max_queue)
