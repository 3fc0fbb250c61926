"""Reading diffusers / transformers folders from local disk: components, configs, safetensors weights.

Only local paths are accepted; nothing here reaches a hub.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from dynamicid_jax.weights.keymap import WeightLoadError, read_safetensors


def _missing(path: str, what: str) -> FileNotFoundError:
    hint = ""
    if not os.path.isabs(path) and path.count("/") == 1 and not path.startswith("."):
        hint = (" (it looks like a hub id: only local paths are accepted — download the model yourself and pass "
                "its folder)")
    return FileNotFoundError(f"{what} {path!r} does not exist{hint}")


def find_component(path: str, component: str) -> str:
    """``path`` itself when it holds a ``config.json``, else ``path/component`` (a pipeline folder)."""
    if not os.path.exists(path):
        raise _missing(path, f"{component} folder")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{component}: expected a folder with config.json, got the file {path!r}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    sub = os.path.join(path, component)
    if os.path.isfile(os.path.join(sub, "config.json")):
        return sub
    raise FileNotFoundError(f"no {component} config in {path!r}: expected {path}/config.json or "
                            f"{path}/{component}/config.json")


def read_config(folder: str, name: str = "config.json") -> dict[str, Any]:
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"missing {name} in {folder!r}")
    try:
        with open(file) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def read_weights(folder: str, stem: str, *, variant: str | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Read ``{stem}[.{variant}].safetensors`` or its sharded form (``….safetensors.index.json``).

    Returns the state dict and a description of the source for error messages."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    single = os.path.join(folder, stem + suffix)
    index = single + ".index.json"
    if os.path.isfile(single):
        return read_safetensors(single), single
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{index} names the shard {shard!r}, which is missing")
            state.update(read_safetensors(shard_path))
        return state, index
    present = sorted(os.listdir(folder))
    if any(p.endswith(".bin") for p in present):
        raise WeightLoadError(f"{folder} holds only PyTorch .bin weights; dynamicid-jax reads .safetensors (no "
                              f"torch at runtime). Re-save the model with safe_serialization=True. Found: {present}")
    raise FileNotFoundError(f"no weights in {folder!r}: expected {os.path.basename(single)} or "
                            f"{os.path.basename(index)}; found {present}")
