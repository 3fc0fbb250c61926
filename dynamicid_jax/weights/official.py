"""Importer for the official DynamicID checkpoints (PyTorch ``.bin`` pickles), without ever running pickled code.

The official release (``ByteCat-bot/DynamicID``) ships three ``torch.save`` files:

================================ ======================================================================
``SAA.bin``                      ``{"proj_module": ProjPlusModel.state_dict(),            (functions.py)
                                 "SAA_module": ModuleList(unet.attn_processors).state_dict()}`` (attention.py)
``IMR.bin``                      ``IMR.state_dict()``                                      (model.py)
``key_point_encoder.bin``        ``KeyPointEncoder.state_dict()`` — running BN statistics   (model.py)
                                 included; its path is ``IMR.bin``'s with "IMR" → "key_point_encoder"
================================ ======================================================================

Loading: :func:`safe_torch_load` reads a file into nested dicts of numpy arrays. With torch installed it uses
``torch.load(..., weights_only=True)``; without torch, a restricted unpickler of our own reads the torch zip
format (``data.pkl`` + ``data/<key>`` storages) and accepts only plain float / int / bool tensors and ordered
dicts. Anything else in the pickle — a global that could run code — raises :class:`UnsafeCheckpointError`
before it is called.

Importing: ``import_id_encoder`` / ``import_imr`` / ``import_keypoint_encoder`` turn a state dict into our params
through the declarative key maps that sit beside each model (``ID_ENCODER_KEYMAP``, ``IMR_KEYMAP``,
``KEYPOINT_ENCODER_KEYMAP``); the configuration is inferred from the tensor shapes unless given. Missing,
unexpected or wrong-shape keys raise :class:`~dynamicid_jax.weights.keymap.WeightLoadError` listing them.

Converted weights are stored as ``<name>.safetensors`` + ``<name>.json`` (:func:`save_converted`,
:func:`load_converted`), so later runs need neither torch nor pickles.

The ``SAA_module`` part of ``SAA.bin`` (LoRA + ``to_k_ip``/``to_v_ip`` per UNet attention processor, in
diffusers' registration order — docs/method.md §4.6) is imported next to the SAA attention strategy;
:func:`read_saa_bin` already splits the file into its two parts, and the SAA importer belongs in the section
marked below.
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import re
import zipfile
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from dynamicid_jax.methods import id_encoder as ide
from dynamicid_jax.methods import imr as imr_mod
from dynamicid_jax.weights import keymap as km
from dynamicid_jax.weights.keymap import WeightLoadError, check_flat_shapes

__all__ = [
    "UnsafeCheckpointError", "safe_torch_load", "read_saa_bin",
    "infer_id_encoder_config", "import_id_encoder", "export_id_encoder", "load_official_id_encoder",
    "infer_imr_config", "import_imr", "export_imr", "load_official_imr",
    "infer_keypoint_encoder_config", "import_keypoint_encoder", "export_keypoint_encoder",
    "load_official_keypoint_encoder", "keypoint_encoder_path_for",
    "save_converted", "load_converted",
]

HEAD_DIM = 64  # the official modules fix dim_head = 64 (heads = width // 64); not recoverable from shapes


def _unbox(tree):
    return nn.meta.unbox(tree)


class UnsafeCheckpointError(WeightLoadError):
    """The checkpoint's pickle references something other than plain tensors; it was not executed."""


# =========================================================================================================
# Safe loading
# =========================================================================================================
def safe_torch_load(path: str, *, backend: str = "auto") -> Any:
    """Read a ``torch.save`` file into nested ``dict``/``list`` of numpy arrays without executing pickled code.

    ``backend``: ``"torch"`` (``torch.load(weights_only=True)``), ``"restricted"`` (our own unpickler for the
    torch zip format; no torch needed), or ``"auto"`` (torch when importable). bf16 tensors are widened to fp32;
    other dtypes are kept. A pickle that references anything but tensors → :class:`UnsafeCheckpointError`."""
    if backend not in ("auto", "torch", "restricted"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'restricted', got {backend!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if backend == "auto":
        try:
            import torch  # noqa: F401
            backend = "torch"
        except ImportError:
            backend = "restricted"
    return _torch_load(path) if backend == "torch" else _restricted_load(path)


def _torch_load(path: str) -> Any:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # torch's message starts with generic advice to disable weights_only; keep the line naming the culprit
        reason = next((ln for ln in lines if "unsupported" in ln.lower() or "WeightsUnpickler" in ln),
                      lines[0] if lines else "")
        raise UnsafeCheckpointError(
            f"refused to load {path}: weights-only unpickling rejected it, so it is not a plain tensor checkpoint "
            f"(its pickle may run code); nothing from the file was executed. torch says: {reason}") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise WeightLoadError(f"{path} is not a readable torch checkpoint: {e}") from e

    def convert(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
        if isinstance(x, Mapping):
            return {k: convert(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(convert(v) for v in x)
        return x

    return convert(obj)


class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co. inside the restricted unpickler: just a dtype."""

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)


def _storage_types() -> dict[str, _StorageType]:
    import ml_dtypes

    table = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
             "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
             "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
    return {name: _StorageType(name, dt) for name, dt in table.items()}


def _rebuild_tensor(storage: np.ndarray, storage_offset: int, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2`` for numpy, with bounds checks (no out-of-storage reads)."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(storage_offset)
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or offset < 0:
        raise WeightLoadError(f"malformed tensor record: size {size}, stride {stride}, offset {offset}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise WeightLoadError(f"tensor record reads past its storage ({last} ≥ {storage.size} elements)")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> np.ndarray:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
        super().__init__(file)
        self._archive, self._prefix, self._byteorder, self._path = archive, prefix, byteorder, path
        self._storages: dict[str, np.ndarray] = {}
        self._types = _storage_types()

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in self._types:
            return self._types[name]
        raise UnsafeCheckpointError(
            f"refused to load {self._path}: its pickle references {module}.{name}, which is not part of a plain "
            f"tensor checkpoint (it could run code); nothing from the file was executed")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"refused to load {self._path}: unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            name = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(name)
            except KeyError:
                raise WeightLoadError(f"{self._path}: storage {name} is missing from the archive") from None
            size = stype.dtype.itemsize
            if len(raw) % size:
                raise WeightLoadError(f"{self._path}: storage {name} has a size that is not a multiple of "
                                      f"{size} bytes")
            if self._byteorder == "big" and size > 1:
                arr = np.frombuffer(raw, dtype=f">u{size}").astype(f"<u{size}").view(stype.dtype)
            else:
                arr = np.frombuffer(raw, dtype=stype.dtype)
            if arr.size < int(numel):
                raise WeightLoadError(f"{self._path}: storage {name} holds {arr.size} elements, expected {numel}")
            self._storages[key] = arr
        return self._storages[key]


def _restricted_load(path: str) -> Any:
    if not zipfile.is_zipfile(path):
        raise WeightLoadError(f"{path} is not a torch zip checkpoint (the legacy pre-1.6 torch format and raw "
                              "pickles can only be read with torch installed, through torch.load(weights_only=True))")
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise WeightLoadError(f"{path}: expected exactly one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()
            if byteorder not in ("little", "big"):
                raise WeightLoadError(f"{path}: unknown byteorder {byteorder!r}")
        with archive.open(pkl[0]) as f:
            try:
                obj = _RestrictedUnpickler(f, archive, prefix, byteorder, path).load()
            except (UnsafeCheckpointError, WeightLoadError):
                raise
            except Exception as e:  # malformed pickle, bad opcode …
                raise WeightLoadError(f"{path}: could not unpickle data.pkl: {e}") from e
    return _plain(obj)


def _plain(x):
    """OrderedDicts → dicts, bf16 → fp32, recursively."""
    import ml_dtypes

    if isinstance(x, np.ndarray):
        return x.astype(np.float32) if x.dtype == ml_dtypes.bfloat16 else x
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


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
# SAA (SAA.bin["SAA_module"]): the importer for the UNet attention processors' LoRA / to_k_ip / to_v_ip lives
# here, beside the SAA strategy's key map (processor order: docs/method.md §4.6). read_saa_bin() provides its input.
# =========================================================================================================


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


# =========================================================================================================
# Converted weights: safetensors + JSON config
# =========================================================================================================
_CONFIG_KINDS = {
    "IDEncoderConfig": (ide.IDEncoderConfig, "id_encoder"),
    "IMRConfig": (imr_mod.IMRConfig, "imr"),
    "KeyPointEncoderConfig": (imr_mod.KeyPointEncoderConfig, "keypoint_encoder"),
}
_FORMAT = "dynamicid-jax/converted-v1"


def _expected_flat_shapes(config) -> dict[str, tuple[int, ...]]:
    if isinstance(config, ide.IDEncoderConfig):
        tree = ide.abstract_params(ide.IDEncoder(config))
    elif isinstance(config, imr_mod.IMRConfig):
        tree = imr_mod.abstract_params(imr_mod.IMR(config))
    else:
        tree = imr_mod.keypoint_abstract_variables(imr_mod.KeyPointEncoder(config))
    return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(_unbox(dict(tree))).items()}


def save_converted(params, config, out_dir: str, *, name: str | None = None) -> str:
    """Write ``params`` (or ``{"params", "batch_stats"}`` for the KeyPointEncoder) to ``<out_dir>/<name>.safetensors``
    and ``config`` to ``<out_dir>/<name>.json``; both atomically (temp file + rename), JSON last. Returns the
    safetensors path. ``name`` defaults to ``id_encoder`` / ``imr`` / ``keypoint_encoder``."""
    kind = type(config).__name__
    if kind not in _CONFIG_KINDS:
        raise ValueError(f"save_converted: unsupported config type {kind}; expected one of {sorted(_CONFIG_KINDS)}")
    name = name or _CONFIG_KINDS[kind][1]
    flat = {"/".join(k): np.asarray(jax.device_get(v))
            for k, v in traverse_util.flatten_dict(_unbox(dict(params))).items()}
    expected = _expected_flat_shapes(config)
    check_flat_shapes(flat, expected, f"save_converted({name})")
    os.makedirs(out_dir, exist_ok=True)
    weights_path = os.path.join(out_dir, f"{name}.safetensors")
    km.write_safetensors(flat, weights_path, metadata={"format": _FORMAT, "config_kind": kind})
    _write_json_atomic(os.path.join(out_dir, f"{name}.json"),
                       {"format": _FORMAT, "kind": kind, "config": config.to_dict()})
    return weights_path


def load_converted(out_dir: str, name: str) -> tuple[Any, dict]:
    """Read what :func:`save_converted` wrote → ``(config, params)`` (a ``{"params", "batch_stats"}`` dict for the
    KeyPointEncoder). Checks every key and shape against the model the config describes."""
    json_path = os.path.join(out_dir, f"{name}.json")
    weights_path = os.path.join(out_dir, f"{name}.safetensors")
    if not os.path.isfile(json_path) or not os.path.isfile(weights_path):
        raise FileNotFoundError(f"no converted weights named {name!r} in {out_dir} (expected {name}.json and "
                                f"{name}.safetensors)")
    with open(json_path) as f:
        meta = json.load(f)
    if meta.get("format") != _FORMAT or meta.get("kind") not in _CONFIG_KINDS:
        raise WeightLoadError(f"{json_path} is not a dynamicid-jax converted-weights config "
                              f"(format {meta.get('format')!r}, kind {meta.get('kind')!r})")
    config = _CONFIG_KINDS[meta["kind"]][0].from_dict(meta["config"])
    flat = km.read_safetensors(weights_path)
    check_flat_shapes(flat, _expected_flat_shapes(config), weights_path)
    return config, traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _write_json_atomic(path: str, obj: Any) -> None:
    from dynamicid_jax.io_atomic import write_json

    write_json(obj, path, indent=2, sort_keys=True)
