"""Reading diffusers / transformers folders from local disk: components, configs, safetensors weights.

Only local paths are accepted; nothing here reaches a hub.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any


from dynamicid_jax.weights.keymap import LazyStateDict, WeightLoadError

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
