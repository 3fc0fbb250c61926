"""Importers and exporters for the official DynamicID checkpoints (PyTorch ``.bin`` pickles), and the converted
per-part format they are stored in; no pickled code is ever run.

The official release (``ByteCat-bot/DynamicID``) ships three ``torch.save`` files:

================================ ======================================================================
``SAA.bin``                      ``{"proj_module": ProjPlusModel.state_dict(),            (functions.py)
                                 "SAA_module": ModuleList(unet.attn_processors).state_dict()}`` (attention.py)
``IMR.bin``                      ``IMR.state_dict()``                                      (model.py)
``key_point_encoder.bin``        ``KeyPointEncoder.state_dict()`` — running BN statistics   (model.py)
                                 included; its path is ``IMR.bin``'s with "IMR" → "key_point_encoder"
================================ ======================================================================

Loading: the files are read by :func:`dynamicid_jax.weights.torch_pickle.safe_torch_load` (``torch.load`` with
``weights_only=True``, or our restricted unpickler without torch); a pickle that references anything but plain
tensors raises :class:`~dynamicid_jax.weights.torch_pickle.UnsafeCheckpointError` before it is called.
:func:`read_saa_bin` splits ``SAA.bin`` into its two parts.

Importing: ``import_id_encoder`` / ``import_imr`` / ``import_keypoint_encoder`` turn a state dict into our params
through the declarative key maps that sit beside each model (``ID_ENCODER_KEYMAP``, ``IMR_KEYMAP``,
``KEYPOINT_ENCODER_KEYMAP``); the configuration is inferred from the tensor shapes unless given. Missing,
unexpected or wrong-shape keys raise :class:`~dynamicid_jax.weights.keymap.WeightLoadError` listing them.

SAA (``import_saa``; docs/method.md §4.6): ``SAA_module`` is the state dict of
``torch.nn.ModuleList(unet.attn_processors.values())``: one entry per UNet attention layer in diffusers'
**registration** order (down blocks → up blocks → mid block, ``attn1`` before ``attn2``;
:func:`~dynamicid_jax.models.unet.attention_layer_names`). Self-attention processors hold four LoRAs,
cross-attention processors the same plus the ID projections::

    {i}.to_q_lora.down.weight [r, C]     {i}.to_q_lora.up.weight [C, r]      (also to_k_lora, to_v_lora,
    {i}.to_k_ip.weight [C, 768]          {i}.to_v_ip.weight [C, 768]          to_out_lora; *_ip in attn2)

Our SAA params live inside each attention module under the same names, so the map is one rename per layer
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.`` ↔ ``0.``) on top of the UNet's list-name rule,
and the usual Linear transposes. The result merges with the base UNet params
(:func:`dynamicid_jax.methods.saa.merge_params`).

Imported parts are stored in DynamicID's weights folder (:mod:`dynamicid_jax.methods.dynamicid_weights`: one
``<name>.safetensors`` + ``<name>.json`` pair per part), so later runs need neither torch nor pickles.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax.linen as nn
import numpy as np
from flax import traverse_util

from dynamicid_jax.methods import id_encoder as ide
from dynamicid_jax.methods import imr as imr_mod
from dynamicid_jax.methods import saa as saa_mod
from dynamicid_jax.models import unet as unet_mod
from dynamicid_jax.weights import keymap as km
from dynamicid_jax.weights.keymap import WeightLoadError
from dynamicid_jax.weights.torch_pickle import safe_torch_load

__all__ = [
    "read_saa_bin",
    "infer_id_encoder_config", "import_id_encoder", "export_id_encoder", "load_official_id_encoder",
    "saa_keymap", "infer_saa_rank", "import_saa", "export_saa", "load_official_saa",
    "infer_imr_config", "import_imr", "export_imr", "load_official_imr",
    "infer_keypoint_encoder_config", "import_keypoint_encoder", "export_keypoint_encoder",
    "load_official_keypoint_encoder", "keypoint_encoder_path_for",
]

HEAD_DIM = 64  # the official modules fix dim_head = 64 (heads = width // 64); not recoverable from shapes


def _unbox(tree):
    return nn.meta.unbox(tree)


def _tensor_dict(state: Any, what: str) -> dict[str, np.ndarray]:
    if not isinstance(state, Mapping):
        raise WeightLoadError(f"{what}: expected a state dict (mapping of names to tensors), "
                              f"got {type(state).__name__}")
    bad = sorted(k for k, v in state.items() if not isinstance(v, np.ndarray) and not hasattr(v, "shape"))
    if bad:
        raise WeightLoadError(f"{what}: entries that are not tensors: {bad[:20]}")
    return {k: np.asarray(v) for k, v in state.items()}


def read_saa_bin(path: str, *, backend: str = "auto") -> dict[str, dict[str, np.ndarray]]:
    """Read the official ``SAA.bin`` → ``{"proj_module": …, "SAA_module": …}`` (state dicts of numpy arrays)."""
    obj = safe_torch_load(path, backend=backend)
    if not isinstance(obj, Mapping) or "proj_module" not in obj or "SAA_module" not in obj:
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightLoadError(f"{path} is not an official SAA.bin: expected top-level keys 'proj_module' and "
                              f"'SAA_module', found {keys}")
    return {"proj_module": _tensor_dict(obj["proj_module"], f"{path}['proj_module']"),
            "SAA_module": _tensor_dict(obj["SAA_module"], f"{path}['SAA_module']")}


# =========================================================================================================
# Shape-based config inference
# =========================================================================================================
def _require(state: Mapping[str, np.ndarray], keys: list[str], what: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise WeightLoadError(f"{what}: cannot infer the configuration, missing key(s): {missing}")


def _layer_count(state: Mapping[str, Any], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in state if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def _heads(inner: int, what: str) -> int:
    if inner % HEAD_DIM:
        raise WeightLoadError(f"{what}: attention width {inner} is not a multiple of the head size {HEAD_DIM}")
    return inner // HEAD_DIM


def infer_id_encoder_config(state: Mapping[str, np.ndarray]) -> ide.IDEncoderConfig:
    """The :class:`IDEncoderConfig` that an official ``proj_module`` state dict describes."""
    p = "perceiver_resampler."
    _require(state, ["proj.0.weight", "proj.2.weight", "norm.weight", p + "proj_in.weight",
                     p + "layers.0.0.to_q.weight", p + "layers.0.1.1.weight"], "ID encoder state dict")
    dim = state["norm.weight"].shape[0]
    return ide.IDEncoderConfig(
        id_embed_dim=state["proj.0.weight"].shape[1], num_tokens=state["proj.2.weight"].shape[0] // dim, dim=dim,
        clip_dim=state[p + "proj_in.weight"].shape[1], depth=_layer_count(state, p + "layers."), head_dim=HEAD_DIM,
        heads=_heads(state[p + "layers.0.0.to_q.weight"].shape[0], "ID encoder"),
        ff_mult=state[p + "layers.0.1.1.weight"].shape[0] // dim).validate()


def infer_imr_config(state: Mapping[str, np.ndarray]) -> imr_mod.IMRConfig:
    """The :class:`IMRConfig` that an official ``IMR.bin`` state dict describes."""
    _require(state, ["proj_in.weight", "feature_fusion.0.weight", "feature_fusion.4.weight",
                     "disentangleNet.0.0.to_q.weight", "disentangleNet.0.2.1.weight"], "IMR state dict")
    dim, emb = state["proj_in.weight"].shape
    return imr_mod.IMRConfig(
        dim=dim, head_dim=HEAD_DIM, heads=_heads(state["disentangleNet.0.0.to_q.weight"].shape[0], "IMR"),
        num_queries=state["feature_fusion.4.weight"].shape[0] // dim, embedding_dim=emb,
        txt_dim=state["feature_fusion.0.weight"].shape[0] - emb,
        ff_mult=state["disentangleNet.0.2.1.weight"].shape[0] // dim,
        disentangle_depth=_layer_count(state, "disentangleNet."),
        entangle_depth=_layer_count(state, "entangleNet.")).validate()


def infer_keypoint_encoder_config(state: Mapping[str, np.ndarray]) -> imr_mod.KeyPointEncoderConfig:
    key = "blocks.6.1.conv_block.0.weight"
    _require(state, [key], "KeyPointEncoder state dict")
    return imr_mod.KeyPointEncoderConfig(embedding_dim=state[key].shape[0]).validate()


# =========================================================================================================
# ID encoder (SAA.bin["proj_module"])
# =========================================================================================================
def import_id_encoder(state: Mapping[str, Any], config: ide.IDEncoderConfig | None = None, *,
                      source: str = "proj_module state dict") -> tuple[ide.IDEncoderConfig, dict]:
    """Official ``ProjPlusModel`` state dict → ``(config, params)``. Also accepts the whole ``SAA.bin`` dict."""
    if isinstance(state, Mapping) and "proj_module" in state:
        state = state["proj_module"]
    state = _tensor_dict(state, source)
    config = config or infer_id_encoder_config(state)
    params = km.load_state_dict(state, ide.ID_ENCODER_KEYMAP, ide.abstract_params(ide.IDEncoder(config)),
                                source=source)
    return config, params


def export_id_encoder(params) -> dict[str, np.ndarray]:
    """Our params → an official-layout ``ProjPlusModel`` state dict (numpy)."""
    return km.export_state_dict(params, ide.ID_ENCODER_KEYMAP)


def load_official_id_encoder(saa_bin_path: str, *, dtype=np.float32,
                             backend: str = "auto") -> tuple[ide.IDEncoder, dict]:
    """``SAA.bin`` → ``(IDEncoder module, params)``."""
    config, params = import_id_encoder(read_saa_bin(saa_bin_path, backend=backend)["proj_module"],
                                       source=f"{saa_bin_path}['proj_module']")
    return ide.IDEncoder(config, dtype=dtype), params


# =========================================================================================================
# SAA (SAA.bin["SAA_module"]): LoRA + to_k_ip / to_v_ip of every UNet attention processor, in diffusers'
# registration order (docs/method.md §4.6). read_saa_bin() provides the input.
# =========================================================================================================
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
    parts = read_saa_bin(path, backend=backend)
    return import_saa(parts["SAA_module"], unet_config, source=f"{path}['SAA_module']", dtype=dtype)


# =========================================================================================================
# IMR (IMR.bin) and KeyPointEncoder (key_point_encoder.bin)
# =========================================================================================================
def import_imr(state: Mapping[str, Any], config: imr_mod.IMRConfig | None = None, *,
               source: str = "IMR state dict") -> tuple[imr_mod.IMRConfig, dict]:
    """Official ``IMR`` state dict → ``(config, params)`` (depths inferred from the keys unless given)."""
    state = _tensor_dict(state, source)
    config = config or infer_imr_config(state)
    params = km.load_state_dict(state, imr_mod.IMR_KEYMAP, imr_mod.abstract_params(imr_mod.IMR(config)),
                                source=source)
    return config, params


def export_imr(params) -> dict[str, np.ndarray]:
    return km.export_state_dict(params, imr_mod.IMR_KEYMAP)


def load_official_imr(imr_bin_path: str, *, dtype=np.float32, backend: str = "auto") -> tuple[imr_mod.IMR, dict]:
    """``IMR.bin`` → ``(IMR module, params)``."""
    config, params = import_imr(safe_torch_load(imr_bin_path, backend=backend), source=imr_bin_path)
    return imr_mod.IMR(config, dtype=dtype), params


def keypoint_encoder_path_for(imr_bin_path: str) -> str:
    """Where the official pipeline looks for the KeyPointEncoder: ``IMR.bin``'s path with "IMR" replaced by
    "key_point_encoder" in the file name."""
    folder, name = os.path.split(imr_bin_path)
    return os.path.join(folder, name.replace("IMR", "key_point_encoder"))


def _merged_keypoint_abstract(config: imr_mod.KeyPointEncoderConfig) -> dict:
    """params and batch_stats in one tree (BatchNorm modules hold scale, bias, mean, var side by side)."""
    abstract = _unbox(imr_mod.keypoint_abstract_variables(imr_mod.KeyPointEncoder(config)))
    flat = traverse_util.flatten_dict(abstract["params"])
    flat.update(traverse_util.flatten_dict(abstract["batch_stats"]))
    return traverse_util.unflatten_dict(flat)


def _split_batch_stats(merged: Mapping) -> dict:
    params, stats = {}, {}
    for path, value in traverse_util.flatten_dict(merged).items():
        (stats if path[-1] in ("mean", "var") else params)[path] = value
    return {"params": traverse_util.unflatten_dict(params), "batch_stats": traverse_util.unflatten_dict(stats)}


def import_keypoint_encoder(state: Mapping[str, Any], config: imr_mod.KeyPointEncoderConfig | None = None, *,
                            source: str = "KeyPointEncoder state dict"
                            ) -> tuple[imr_mod.KeyPointEncoderConfig, dict]:
    """Official ``KeyPointEncoder`` state dict → ``(config, {"params": …, "batch_stats": …})``.

    ``running_mean``/``running_var`` become ``batch_stats``; ``num_batches_tracked`` is not used (the official
    BatchNorms have a fixed momentum) and is skipped."""
    state = _tensor_dict(state, source)
    config = config or infer_keypoint_encoder_config(state)
    merged = km.load_state_dict(state, imr_mod.KEYPOINT_ENCODER_KEYMAP, _merged_keypoint_abstract(config),
                                source=source)
    return config, _split_batch_stats(merged)


def export_keypoint_encoder(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{"params", "batch_stats"}`` → an official-layout state dict that ``load_state_dict(strict=True)`` accepts.
    ``num_batches_tracked`` (required by torch, unused with a fixed momentum) is written as 0."""
    flat = traverse_util.flatten_dict(_unbox(dict(variables["params"])))
    flat.update(traverse_util.flatten_dict(_unbox(dict(variables["batch_stats"]))))
    state = km.export_state_dict(traverse_util.unflatten_dict(flat), imr_mod.KEYPOINT_ENCODER_KEYMAP)
    for key in [k for k in state if k.endswith(".running_mean")]:
        state[key[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return state


def load_official_keypoint_encoder(path: str, *, dtype=np.float32,
                                   backend: str = "auto") -> tuple[imr_mod.KeyPointEncoder, dict]:
    """``key_point_encoder.bin`` → ``(KeyPointEncoder module, {"params", "batch_stats"})``."""
    config, variables = import_keypoint_encoder(safe_torch_load(path, backend=backend), source=path)
    return imr_mod.KeyPointEncoder(config, dtype=dtype), variables
