"""Read PyTorch ``torch.save`` files (pickles) into numpy without ever running pickled code.

:func:`safe_torch_load` reads a file into nested dicts of numpy arrays. With torch installed it uses
``torch.load(..., weights_only=True)``; without torch, a restricted unpickler of our own reads the torch zip
format (``data.pkl`` + ``data/<key>`` storages) and accepts only plain float / int / bool tensors and ordered
dicts. Anything else in the pickle — a global that could run code — raises :class:`UnsafeCheckpointError`
before it is called.

This module knows no model: the importers that turn such state dicts into method params sit beside their method
(the official DynamicID checkpoints: :mod:`dynamicid_jax.methods.dynamicid_official`).
"""
from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np

from dynamicid_jax.weights.keymap import WeightLoadError

__all__ = ["UnsafeCheckpointError", "safe_torch_load"]


class UnsafeCheckpointError(WeightLoadError):
    """The checkpoint's pickle references something other than plain tensors; it was not executed."""


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
