"""Infinite-ID's weights folder — our own format, as no official Infinite-ID weights exist. What
``python -m train.infinite_id`` exports and :class:`~dynamicid_jax.pipelines.infinite_id.InfiniteIDPipeline` loads:
``infinite_id.safetensors`` (the encoder under ``encoder/…``, the UNet's ``to_k_id`` / ``to_v_id`` under
``unet/…``) and ``infinite_id.json`` (format, encoder config, the UNet's cross-attention width). Written
atomically, JSON last; every key and shape is checked on both sides against the encoder config and the UNet.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dynamicid_jax.methods.infinite_id import InfiniteIDEncoderConfig, abstract_encoder_params, abstract_id_params
from dynamicid_jax.weights import keymap as km
from dynamicid_jax.weights.keymap import read_part

__all__ = ["WEIGHTS_NAME", "save_infinite_id", "load_infinite_id"]

_FORMAT = "dynamicid-jax/infinite-id-v1"
WEIGHTS_NAME = "infinite_id"


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(jax.device_get(v))
            for k, v in traverse_util.flatten_dict(nn.meta.unbox(dict(tree))).items()}


def _expected(encoder_config: InfiniteIDEncoderConfig, unet_config) -> dict[str, tuple[int, ...]]:
    out = {}
    trees = (("encoder", abstract_encoder_params(encoder_config)), ("unet", abstract_id_params(unet_config)))
    for prefix, tree in trees:
        out.update({f"{prefix}/{'/'.join(k)}": tuple(v.shape)
                    for k, v in traverse_util.flatten_dict(nn.meta.unbox(dict(tree))).items()})
    return out


def save_infinite_id(folder: str, encoder_config: InfiniteIDEncoderConfig, encoder_params, id_params,
                     unet_config) -> str:
    """Write ``<folder>/infinite_id.safetensors`` (keys ``encoder/…`` and ``unet/…/to_k_id/kernel``) and
    ``infinite_id.json`` (format + encoder config + the UNet's cross-attention width), atomically, JSON last."""
    flat = {**{f"encoder/{k}": v for k, v in _flat(encoder_params).items()},
            **{f"unet/{k}": v for k, v in _flat(id_params).items()}}
    km.check_flat_shapes(flat, _expected(encoder_config, unet_config), f"save_infinite_id({folder})",
                         what="the Infinite-ID encoder config / UNet")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{WEIGHTS_NAME}.safetensors")
    km.write_safetensors(flat, path, metadata={"format": _FORMAT})
    meta = {"format": _FORMAT, "encoder": encoder_config.to_dict(),
            "cross_attention_dim": int(unet_config.cross_attention_dim)}
    from dynamicid_jax.file_io import write_json

    write_json(meta, os.path.join(folder, f"{WEIGHTS_NAME}.json"), indent=2, sort_keys=True)
    return path


def load_infinite_id(folder: str, unet_config) -> tuple[InfiniteIDEncoderConfig, dict, dict]:
    """Read :func:`save_infinite_id`'s files → ``(encoder_config, encoder_params, id_params)``; every key and
    shape is checked against the encoder config and ``unet_config``."""
    meta, weights_path = read_part(folder, WEIGHTS_NAME, "Infinite-ID weights",
                                   written_by="save_infinite_id / training")
    json_path = os.path.join(folder, f"{WEIGHTS_NAME}.json")
    if meta.get("format") != _FORMAT:
        raise km.WeightLoadError(f"{json_path}: format {meta.get('format')!r}, expected {_FORMAT!r}")
    config = InfiniteIDEncoderConfig.from_dict(meta["encoder"])
    if meta.get("cross_attention_dim") != unet_config.cross_attention_dim or config.dim != \
            unet_config.cross_attention_dim:
        raise km.WeightLoadError(f"{json_path}: weights for a UNet with cross-attention width "
                                 f"{meta.get('cross_attention_dim')}, but this UNet has "
                                 f"{unet_config.cross_attention_dim}")
    flat = km.read_safetensors(weights_path)
    km.check_flat_shapes(flat, _expected(config, unet_config), weights_path,
                         what="the Infinite-ID encoder config / UNet")
    tree = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
    return config, tree["encoder"], tree["unet"]
