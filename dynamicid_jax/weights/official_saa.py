"""Importer for the ``SAA_module`` part of the official DynamicID ``SAA.bin`` (docs/method.md §4.6).

``SAA_module`` is the state dict of ``torch.nn.ModuleList(unet.attn_processors.values())``: one entry per UNet
attention layer in diffusers' **registration** order (down blocks → up blocks → mid block, ``attn1`` before
``attn2``; :func:`~dynamicid_jax.models.unet.attention_layer_names`). Self-attention processors hold four LoRAs,
cross-attention processors the same plus the ID projections::

    {i}.to_q_lora.down.weight [r, C]     {i}.to_q_lora.up.weight [C, r]      (also to_k_lora, to_v_lora,
    {i}.to_k_ip.weight [C, 768]          {i}.to_v_ip.weight [C, 768]          to_out_lora; *_ip in attn2)

Our SAA params live inside each attention module under the same names, so the map is one rename per layer
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.`` ↔ ``0.``) on top of the UNet's list-name rule,
and the usual Linear transposes. The result merges with the base UNet params
(:func:`dynamicid_jax.methods.saa.merge_params`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from dynamicid_jax.methods import saa as saa_mod
from dynamicid_jax.models import unet as unet_mod
from dynamicid_jax.weights import keymap as km
from dynamicid_jax.weights.keymap import WeightLoadError

__all__ = ["saa_keymap", "infer_saa_rank", "import_saa", "export_saa", "load_official_saa"]


def saa_keymap(unet_config: unet_mod.UNetConfig) -> km.KeyMap:
    """Flax path ``down_blocks_0/…/attn1/to_q_lora/down/kernel`` ↔ torch ``0.to_q_lora.down.weight``."""
    names = unet_mod.attention_layer_names(unet_config)
    renames = tuple((rf"^{re.escape(name)}\.", f"{i}.") for i, name in enumerate(names))
    return km.KeyMap(list_names=unet_mod.UNET_KEYMAP.list_names, renames=renames)


def _saa_state(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept the ``SAA_module`` state dict itself or the whole ``SAA.bin`` dict."""
    if isinstance(state, Mapping) and "SAA_module" in state and isinstance(state["SAA_module"], Mapping):
        return state["SAA_module"]
    if not isinstance(state, Mapping):
        raise WeightLoadError(f"SAA_module: expected a state dict, got {type(state).__name__}")
    return state


def infer_saa_rank(state: Mapping[str, Any]) -> int:
    """The LoRA rank of an ``SAA_module`` state dict (all layers must agree)."""
    state = _saa_state(state)
    ranks = {np.asarray(v).shape[0] for k, v in state.items() if re.fullmatch(r"\d+\.to_[a-z]+_lora\.down\.weight", k)}
    if not ranks:
        raise WeightLoadError("SAA_module: no LoRA keys like '0.to_q_lora.down.weight' found; keys start with "
                              f"{sorted(state)[:5]}")
    if len(ranks) > 1:
        raise WeightLoadError(f"SAA_module: LoRA layers disagree on the rank: {sorted(ranks)}")
    return int(ranks.pop())


def import_saa(state: Mapping[str, Any], unet_config: unet_mod.UNetConfig, *,
               strategy: saa_mod.SAA | None = None, source: str = "SAA_module", dtype=np.float32) -> dict:
    """``SAA_module`` state dict (or the whole ``SAA.bin`` dict) → SAA params for ``unet_config``.

    The LoRA rank is read from the file unless ``strategy`` is given (then its ``lora_rank`` must match). Missing,
    unexpected or wrong-shape keys raise :class:`WeightLoadError` listing them."""
    state = _saa_state(state)
    rank = infer_saa_rank(state)
    if strategy is None:
        strategy = saa_mod.SAA(lora_rank=rank)
    elif strategy.lora_rank != rank:
        raise WeightLoadError(f"{source}: the file's LoRA rank is {rank}, the strategy's {strategy.lora_rank}")
    abstract = saa_mod.abstract_saa_params(unet_config, strategy)
    return km.load_state_dict({k: np.asarray(v) for k, v in state.items()}, saa_keymap(unet_config), abstract,
                              source=source, dtype=dtype)


def export_saa(params: Mapping, unet_config: unet_mod.UNetConfig) -> dict[str, np.ndarray]:
    """SAA params (alone or merged with the base UNet's) → an ``SAA_module`` state dict (numpy, torch layout)."""
    _, saa_params = saa_mod.split_saa_params(params)
    if not saa_params:
        raise ValueError("export_saa: no SAA params (to_*_lora / to_*_ip) in the given tree")
    return km.export_state_dict(saa_params, saa_keymap(unet_config))


def load_official_saa(path: str, unet_config: unet_mod.UNetConfig, *, backend: str = "auto",
                      dtype=np.float32) -> dict:
    """Read the official ``SAA.bin`` safely (no pickled code runs) and import its ``SAA_module``."""
    from dynamicid_jax.weights.official import read_saa_bin

    parts = read_saa_bin(path, backend=backend)
    return import_saa(parts["SAA_module"], unet_config, source=f"{path}['SAA_module']", dtype=dtype)
