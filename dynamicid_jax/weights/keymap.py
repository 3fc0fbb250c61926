"""Declarative PyTorch ↔ Flax weight mapping, and the files it reads and writes: safetensors files and
diffusers / transformers folders on local disk (components, configs, weights; nothing here reaches a hub).

A :class:`KeyMap` is one model's whole conversion, written as data:

* ``renames`` — regex substitutions applied in order to a Flax parameter path (``"/"``-joined module names,
  e.g. ``down_blocks_0/resnets_1/conv1/kernel``) that turn it into the PyTorch state-dict key
  (``down_blocks.0.resnets.1.conv1.weight``);
* the leaf transform follows from the Flax leaf name and rank: Dense ``kernel [in, out]`` ↔ torch
  ``weight [out, in]`` (transpose), Conv ``kernel HWIO`` ↔ ``OIHW``, ``scale``/``embedding`` ↔ ``weight``,
  BatchNorm ``mean``/``var`` ↔ ``running_mean``/``running_var``;
* ``reshapes`` — optional per-key reshapes (e.g. a 1×1 conv stored as a Linear weight);
* ``ignore`` — patterns of torch keys that carry no parameters we use (``position_ids`` buffers …).

The direction Flax → torch is unambiguous, so both loading and exporting enumerate the *expected* Flax tree
(from ``jax.eval_shape`` of the module's ``init``) and look torch keys up. Loading reports every missing,
unexpected and wrong-shape key in one :class:`WeightLoadError` that names the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

Params = Mapping[str, Any]

# "down_blocks_0" → "down_blocks.0" for module lists; names like "linear_1" that are not lists are kept
# because only the names listed in a model's ``list_names`` are split.
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}


class WeightLoadError(ValueError):
    """Raised when a checkpoint does not match the model it is loaded into."""


def _shorten(items: list[str], limit: int = 20) -> str:
    more = f"\n    … and {len(items) - limit} more" if len(items) > limit else ""
    return "\n".join(f"    {i}" for i in items[:limit]) + more


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """One model's declarative mapping between a Flax param tree and a PyTorch state dict."""

    list_names: tuple[str, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    # torch keys whose stored shape differs from the transformed Flax shape only by a reshape
    reshape_linear_as_conv: bool = True
    # Flax leaf names of bare parameters (``self.param("class_embedding", ...)``) whose torch key ends in the
    # same name (an ``nn.Parameter`` attribute, no ``.weight`` suffix)
    bare_params: tuple[str, ...] = ()

    def torch_key(self, flax_path: tuple[str, ...]) -> str:
        *modules, leaf = flax_path
        parts = []
        for name in modules:
            m = re.fullmatch(r"(.+)_(\d+)", name)
            if m and m.group(1) in self.list_names:
                parts += [m.group(1), m.group(2)]
            else:
                parts.append(name)
        if leaf in self.bare_params:
            parts.append(leaf)
        elif leaf not in _LEAF_TO_TORCH:
            raise KeyError(f"no torch name for Flax leaf {leaf!r} in {'/'.join(flax_path)}")
        else:
            parts.append(_LEAF_TO_TORCH[leaf])
        key = ".".join(parts)
        for pattern, repl in self.renames:
            key = re.sub(pattern, repl, key)
        return key

    def is_ignored(self, torch_key: str) -> bool:
        return any(re.search(p, torch_key) for p in self.ignore)


def torch_to_flax_array(leaf: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Convert one torch tensor (as numpy) to the layout of the Flax leaf ``leaf`` of ``target_shape``."""
    if leaf == "kernel":
        if value.ndim == 2 and len(target_shape) == 2:
            value = value.T
        elif value.ndim == 4 and len(target_shape) == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW → HWIO
        # a reshape only where the sizes agree; otherwise the tensor keeps its shape and the caller's keyed
        # wrong-shape report names it (instead of numpy's bare "cannot reshape" error)
        elif value.ndim == 2 and len(target_shape) == 4 and value.size == int(np.prod(target_shape)):
            value = value.T.reshape(target_shape)  # Linear weight into a 1×1 conv
        elif value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):
            value = value.reshape(value.shape[0], value.shape[1]).T  # 1×1 conv weight into a Dense
    return value


def flax_to_torch_array(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 2:
            return value.T
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1)  # HWIO → OIHW
    return value


def _flat_shapes(abstract_params: Params) -> dict[tuple[str, ...], tuple[int, ...]]:
    flat = traverse_util.flatten_dict(_unbox(abstract_params))
    return {k: tuple(v.shape) for k, v in flat.items()}


def _unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def load_state_dict(state: Mapping[str, np.ndarray], keymap: KeyMap, abstract_params: Params, *,
                    source: str, dtype=np.float32, place: Callable[[np.ndarray], Any] | None = None) -> dict:
    """Map a torch-named ``state`` onto the Flax tree described by ``abstract_params``.

    ``abstract_params`` is the (possibly boxed) output of ``jax.eval_shape(model.init, ...)["params"]``.
    ``place`` (e.g. ``jnp.asarray``) is applied to each converted leaf as soon as it exists, so with a
    :class:`LazyStateDict` at most one tensor is held in host memory besides the placed params (a full-size SDXL
    UNet is 10 GB in fp32). Each tensor of ``state`` is read once. Raises :class:`WeightLoadError` naming
    ``source`` and listing the first 20 missing / unexpected / wrong-shape keys.
    """
    expected = _flat_shapes(abstract_params)
    by_torch = {keymap.torch_key(path): path for path in expected}
    if len(by_torch) != len(expected):
        raise AssertionError("key map sends two Flax params to one torch key")  # a bug in the map itself
    missing = sorted(k for k in by_torch if k not in state)
    unexpected = sorted(k for k in state if k not in by_torch and not keymap.is_ignored(k))
    wrong_shape, flat = [], {}
    for key, path in by_torch.items():
        if key not in state:
            continue
        raw = np.asarray(state[key])
        value = torch_to_flax_array(path[-1], raw, expected[path])
        if tuple(value.shape) != expected[path]:
            wrong_shape.append(f"{key}: file {tuple(raw.shape)}, model expects "
                               f"{expected[path]} (Flax {'/'.join(path)})")
            continue
        del raw
        value = np.ascontiguousarray(value, dtype=dtype)
        flat[path] = value if place is None else place(value)
    if missing or unexpected or wrong_shape:
        msg = [f"weights in {source} do not match the model:"]
        if missing:
            msg.append(f"  {len(missing)} missing key(s):\n{_shorten(missing)}")
        if unexpected:
            msg.append(f"  {len(unexpected)} unexpected key(s):\n{_shorten(unexpected)}")
        if wrong_shape:
            msg.append(f"  {len(wrong_shape)} wrong-shape key(s):\n{_shorten(wrong_shape)}")
        raise WeightLoadError("\n".join(msg))
    return traverse_util.unflatten_dict(flat)


def export_state_dict(params: Params, keymap: KeyMap) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_state_dict`: a torch-named, torch-layout state dict of numpy arrays."""
    flat = traverse_util.flatten_dict(_unbox(params))
    out = {}
    for path, value in flat.items():
        out[keymap.torch_key(path)] = np.ascontiguousarray(flax_to_torch_array(path[-1], np.asarray(value)))
    return out


def check_flat_shapes(flat: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str,
                      what: str = "its config") -> None:
    """Every key of ``expected`` present in ``flat`` with exactly that shape, and nothing else; otherwise one
    :class:`WeightLoadError` naming ``source`` and listing the first missing / unexpected / wrong-shape keys
    (``"{source} does not match {what}: …"``). The one shape check of every weights format we write."""
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = sorted(f"{k}: {tuple(np.shape(flat[k]))} != {tuple(expected[k])}" for k in set(flat) & set(expected)
                   if tuple(np.shape(flat[k])) != tuple(expected[k]))
    if missing or unexpected or wrong:
        raise WeightLoadError(f"{source} does not match {what}: missing {missing[:20]}, unexpected "
                              f"{unexpected[:20]}, wrong shape {wrong[:20]}")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file into numpy arrays (no torch); bf16/fp16 tensors are widened to fp32."""
    from safetensors.numpy import load_file

    try:
        state = load_file(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise WeightLoadError(f"{path} is not a readable .safetensors file: {e}") from e
    return {k: (v.astype(np.float32) if v.dtype != np.float32 and v.dtype.kind == "f" else v)
            for k, v in state.items()}


class _IndexedMapping(Mapping[str, Any]):
    """A read-only mapping whose keys are those of ``self._index`` (a dict: key → where its value comes from)."""

    _index: dict[str, Any]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index


class LazyStateDict(_IndexedMapping):
    """The tensors of one or more ``.safetensors`` files (a sharded checkpoint), read one at a time on access.

    Like :func:`read_safetensors`, non-fp32 float tensors are widened to fp32. Only the headers are read when it
    is built; each ``state[key]`` reads that tensor from disk (the files are memory-mapped), so a loader that
    converts and places tensor by tensor never holds the whole checkpoint in host memory."""

    def __init__(self, paths: str | Sequence[str]):
        from safetensors import safe_open

        self._handles: dict[str, Any] = {}
        self._index: dict[str, str] = {}  # tensor name → its file
        for path in [paths] if isinstance(paths, str) else list(paths):
            try:
                handle = safe_open(path, framework="numpy")
            except FileNotFoundError:
                raise
            except Exception as e:  # safetensors raises its own error types for truncated / foreign files
                raise WeightLoadError(f"{path} is not a readable .safetensors file: {e}") from e
            self._handles[path] = handle
            self._index.update(dict.fromkeys(handle.keys(), path))

    def __getitem__(self, key: str) -> np.ndarray:
        path = self._index[key]
        try:
            value = self._handles[path].get_tensor(key)
        except Exception as e:
            raise WeightLoadError(f"{path}: tensor {key!r} cannot be read: {e}") from e
        return value.astype(np.float32) if value.dtype != np.float32 and value.dtype.kind == "f" else value


class RenamedStateDict(_IndexedMapping):
    """A view of ``state`` with keys renamed by ``rename`` (``None`` drops a key); values are read from ``state``
    only when accessed, so renaming keeps a :class:`LazyStateDict` lazy."""

    def __init__(self, state: Mapping[str, Any], rename: Callable[[str], str | None]):
        self._state = state
        self._index: dict[str, str] = {}  # new name → the key in state
        for key in state:
            new = rename(key)
            if new is not None:
                self._index[new] = key

    def __getitem__(self, key: str) -> Any:
        return self._state[self._index[key]]


def write_safetensors(state: Mapping[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write atomically (:func:`dynamicid_jax.file_io.atomic_path`: temp file in the same folder, fsync,
    rename; the mode follows the umask)."""
    from safetensors.numpy import save_file

    from dynamicid_jax.file_io import atomic_path

    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp, metadata=metadata)


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(_unbox(tree))))


# ---------------------------------------------------------------------------------------------------------
# Diffusers / transformers folders on local disk: components, configs, safetensors weights
# ---------------------------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FOREIGN_WEIGHTS = (".bin", ".pt", ".ckpt", ".h5", ".msgpack")


class HubIdError(FileNotFoundError, ValueError):
    """A path that does not exist and looks like a hub id: only local folders are accepted."""


class OnlyTorchWeightsError(WeightLoadError, FileNotFoundError):
    """The folder has no .safetensors weights, only PyTorch pickles (which we never load at runtime)."""


def missing_path_error(path: str | os.PathLike, what: str, expected: str) -> FileNotFoundError:
    """The uniform error for a path that does not exist (a :class:`HubIdError` when it looks like a hub id)."""
    path = os.fspath(path)
    if _HUB_ID.match(path) and not path.startswith("."):
        return HubIdError(f"{what} path {path!r} does not exist and looks like a Hugging Face Hub id, but only "
                          f"local folders are accepted; download the model and pass its folder")
    return FileNotFoundError(f"{what} folder {path} does not exist (expected {expected})")


def find_component(path: str | os.PathLike, component: str, *, what: str | None = None) -> str:
    """``path`` itself when it holds a ``config.json``, else ``path/component`` (a pipeline root)."""
    what = what or component
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise missing_path_error(path, what, "a folder with config.json and weights")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{what}: expected a folder with config.json, got the file {path!r}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    sub = os.path.join(path, component)
    if os.path.isfile(os.path.join(sub, "config.json")):
        return sub
    raise FileNotFoundError(f"no {what} config.json in {path!r}: expected {path}/config.json or "
                            f"{path}/{component}/config.json")


def read_config(folder: str | os.PathLike, name: str = "config.json") -> dict[str, Any]:
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"missing {name} in {folder!r}")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def read_part(folder: str | os.PathLike, name: str, what: str, *,
              written_by: str | None = None) -> tuple[dict[str, Any], str]:
    """One part of a method's weights folder, stored as ``<name>.json`` + ``<name>.safetensors``: the parsed JSON
    and the safetensors path. Either file missing → ``FileNotFoundError("no {what} in {folder} (expected …)")``."""
    folder = os.fspath(folder)
    weights_path = os.path.join(folder, f"{name}.safetensors")
    if not os.path.isfile(os.path.join(folder, f"{name}.json")) or not os.path.isfile(weights_path):
        by = f", written by {written_by}" if written_by else ""
        raise FileNotFoundError(f"no {what} in {folder!r} (expected {name}.json and {name}.safetensors{by})")
    return read_config(folder, f"{name}.json"), weights_path


def read_weights(folder: str | os.PathLike, stem: str, *,
                 variant: str | None = None) -> tuple[LazyStateDict, str]:
    """Open ``{stem}[.{variant}].safetensors`` or its sharded form (``….safetensors.index.json``).

    Returns the state dict — a :class:`~dynamicid_jax.weights.keymap.LazyStateDict` that reads each tensor when it
    is accessed — and the file it came from (for error messages)."""
    folder = os.fspath(folder)
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    single, index = os.path.join(folder, name), os.path.join(folder, name + ".index.json")
    if os.path.isfile(single):
        return LazyStateDict(single), single
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map')") from e
        paths = [os.path.join(folder, shard) for shard in shards]
        for shard, shard_path in zip(shards, paths):
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{index} lists shard {shard}, which is missing from {folder}")
        return LazyStateDict(paths), index
    present = sorted(os.listdir(folder))
    foreign = [p for p in present if p.endswith(_FOREIGN_WEIGHTS)]
    if foreign:
        raise OnlyTorchWeightsError(f"{folder} has neither {name} nor {name}.index.json, only {foreign}: dynamicid-jax "
                              f"reads .safetensors (no torch at runtime); re-save with safe_serialization=True")
    raise FileNotFoundError(f"no weights in {folder!r}: expected {name} or {name}.index.json; found {present}")


def is_sdxl(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an SDXL model: a diffusers folder with ``text_encoder_2/`` (or whose
    ``model_index.json`` names an SDXL pipeline), or a single ``.safetensors`` file with SDXL's second text encoder
    (``conditioner.embedders.1.model.*``). Anything else (SD1.x folders and files) is False."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            return False
        from dynamicid_jax.weights.single_file_sdxl import is_sdxl_single_file

        return is_sdxl_single_file(path)
    if not os.path.isdir(path):
        return False
    if os.path.isdir(os.path.join(path, "text_encoder_2")):
        return True
    index = os.path.join(path, "model_index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            try:
                return "XL" in str(json.load(f).get("_class_name", ""))
            except (json.JSONDecodeError, AttributeError):
                return False
    return False


def is_single_file(path: str, config: str | os.PathLike | None) -> bool:
    """Whether a pipeline's ``from_pretrained(path, config=...)`` reads a single ``.safetensors`` checkpoint (True)
    or a diffusers folder (False); a file of another kind, or ``config`` given with a folder, is an error."""
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"single-file checkpoints must be .safetensors files, got {path!r}")
        return True
    if config is not None:
        raise ValueError("`config` is only for single-file checkpoints; a diffusers folder has its own configs")
    return False


def check_pipeline_folder(path: str, parts: Sequence[str], what: str) -> None:
    """``path`` is a diffusers folder holding every subfolder in ``parts``; ``what`` names the model in the error
    (``"Stable Diffusion"``, ``"SDXL"``)."""
    if not os.path.isdir(path):
        find_component(path, "model")  # raises the uniform "does not exist" / hub-id error
    for part in parts:
        if not os.path.isdir(os.path.join(path, part)):
            raise FileNotFoundError(f"{path!r} is not a diffusers {what} folder: missing {part}/")


def override_configs(configs: dict[str, dict], config: str | os.PathLike | None, parts: Sequence[str],
                     expected: str) -> dict[str, dict]:
    """``configs`` (a single file's built-in component configs) with those that the diffusers folder ``config``
    holds for ``parts`` and its ``scheduler/`` read over them; ``expected`` describes the folder in the error
    when ``config`` is not one."""
    if config is None:
        return configs
    config = os.fspath(config)
    if not os.path.isdir(config):
        raise missing_path_error(config, "config", expected)
    for part in parts:
        if os.path.isfile(os.path.join(config, part, "config.json")):
            configs[part] = read_config(os.path.join(config, part))
    if os.path.isfile(os.path.join(config, "scheduler", "scheduler_config.json")):
        configs["scheduler"] = read_config(os.path.join(config, "scheduler"), "scheduler_config.json")
    return configs
