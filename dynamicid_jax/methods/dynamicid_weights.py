"""DynamicID's weights folder — what ``python -m infer.convert`` (official checkpoints) and
``python -m train.export_dynamicid`` (our training) write and :class:`~dynamicid_jax.pipelines.dynamicid.DynamicIDPipeline`
loads: ``dynamicid.json`` (format, parts, backbone) and one safetensors + JSON config per part (SAA, ID encoder,
IMR + KeyPointEncoder). Written atomically (a temporary folder renamed into place); every key and shape is checked
on both sides. The pipeline module re-exports these names.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from dynamicid_jax.methods import id_encoder as ide
from dynamicid_jax.methods import imr as imr_mod
from dynamicid_jax.methods import saa as saa_mod
from dynamicid_jax.models.unet import UNetConfig
from dynamicid_jax.weights import keymap as km
from dynamicid_jax.weights.keymap import read_part

__all__ = ["FOLDER_FORMAT", "MANIFEST", "DynamicIDWeights", "backbone_of", "save_dynamicid", "load_dynamicid",
           "check_overwritable", "check_saa_shapes", "save_converted", "load_converted"]

FOLDER_FORMAT = "dynamicid-jax/dynamicid-v1"
MANIFEST = "dynamicid.json"


@dataclasses.dataclass
class DynamicIDWeights:
    """Everything DynamicID adds to Stable Diffusion (numpy / jax pytrees, fp32). IMR and KeyPointEncoder are
    optional (needed only for face prompts) but come together."""

    id_encoder_config: ide.IDEncoderConfig
    id_encoder_params: dict
    saa: saa_mod.SAA
    saa_unet_config: UNetConfig
    saa_params: dict
    imr_config: imr_mod.IMRConfig | None = None
    imr_params: dict | None = None
    keypoint_encoder_config: imr_mod.KeyPointEncoderConfig | None = None
    keypoint_encoder_variables: dict | None = None  # {"params": …, "batch_stats": …}

    def __post_init__(self):
        if (self.imr_params is None) != (self.keypoint_encoder_variables is None):
            raise ValueError("DynamicIDWeights: the IMR and the KeyPointEncoder come together (give both or neither)")

    @property
    def has_imr(self) -> bool:
        return self.imr_params is not None

    @property
    def backbone(self) -> str:
        """The base model these weights belong to: ``"SDXL"`` (a UNet with SDXL's added text/time conditioning) or
        ``"SD1.x"``. Recorded in the folder's manifest; a pipeline refuses weights of another backbone."""
        return backbone_of(self.saa_unet_config)


def backbone_of(unet_config: UNetConfig) -> str:
    """``"SDXL"`` or ``"SD1.x"``: what a UNet config is the UNet of."""
    return "SDXL" if unet_config.text_time else "SD1.x"


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(jax.device_get(v)) for k, v in
            traverse_util.flatten_dict(nn.meta.unbox(dict(tree))).items()}


def _write_json(path: str, obj: Any) -> None:
    from dynamicid_jax.file_io import write_json

    write_json(obj, path, indent=2, sort_keys=True)


def _flat_shapes(abstract) -> dict[str, tuple[int, ...]]:
    """``"/"``-joined path → shape of an abstract (boxed or not) param tree."""
    return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.meta.unbox(dict(abstract))).items()}


def _saa_shapes(strategy: saa_mod.SAA, unet_config: UNetConfig) -> dict[str, tuple[int, ...]]:
    return _flat_shapes(saa_mod.abstract_saa_params(unet_config, strategy))


def save_dynamicid(out_dir: str | os.PathLike, weights: DynamicIDWeights, *, overwrite: bool = False) -> str:
    """Write the converted folder (layout in the module docstring) atomically: everything goes to a temporary
    sibling folder that is renamed to ``out_dir`` at the end. ``overwrite=True`` replaces an existing folder."""
    from dynamicid_jax.file_io import atomic_folder

    out_dir = os.path.abspath(os.fspath(out_dir))
    check_overwritable(out_dir, overwrite)
    with atomic_folder(out_dir, replace=True) as tmp:
        save_converted(weights.id_encoder_params, weights.id_encoder_config, tmp, name="id_encoder")
        flat = _flat(weights.saa_params)
        km.check_flat_shapes(flat, _saa_shapes(weights.saa, weights.saa_unet_config), "SAA params",
                             what="its UNet")
        km.write_safetensors(flat, os.path.join(tmp, "saa.safetensors"), metadata={"format": FOLDER_FORMAT})
        _write_json(os.path.join(tmp, "saa.json"), {"format": FOLDER_FORMAT, "kind": "SAA",
                                                    "strategy": dataclasses.asdict(weights.saa),
                                                    "unet_config": weights.saa_unet_config.to_dict()})
        parts = ["id_encoder", "saa"]
        if weights.has_imr:
            save_converted(weights.imr_params, weights.imr_config, tmp, name="imr")
            save_converted(weights.keypoint_encoder_variables, weights.keypoint_encoder_config, tmp,
                           name="keypoint_encoder")
            parts += ["imr", "keypoint_encoder"]
        _write_json(os.path.join(tmp, MANIFEST), {"format": FOLDER_FORMAT, "parts": parts,
                                                  "backbone": weights.backbone})
    return out_dir


def check_overwritable(out_dir: str, overwrite: bool) -> None:
    """``out_dir`` may be written: it does not exist, it is an empty folder (nothing in it to destroy), or
    ``overwrite`` is set and it is a folder we wrote (it carries our manifest with our format tag). Anything else —
    a user's folder, an SD model, a file — is refused: ``--overwrite`` never deletes what we did not write."""
    if not os.path.lexists(out_dir):
        return
    if os.path.isdir(out_dir) and not os.path.islink(out_dir) and not os.listdir(out_dir):
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace a converted "
                              f"folder)")
    marker = os.path.join(out_dir, MANIFEST)
    ours = False
    if os.path.isdir(out_dir) and not os.path.islink(out_dir) and os.path.isfile(marker):
        try:
            with open(marker) as f:
                ours = json.load(f).get("format") == FOLDER_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
    if not ours:
        raise FileExistsError(f"--overwrite refused: {out_dir} is not a converted DynamicID folder written by this "
                              f"tool (no {MANIFEST} with format {FOLDER_FORMAT!r}); it is left untouched: choose a "
                              f"new --out or remove it yourself")


def load_dynamicid(path: str | os.PathLike) -> DynamicIDWeights:
    """Read a converted folder (checks every key and shape against the configs it holds)."""
    from dynamicid_jax.file_io import check_readable

    path = os.fspath(path)
    manifest = os.path.join(path, MANIFEST)
    check_readable(manifest, "the converted DynamicID folder's manifest")
    if not os.path.isfile(manifest):
        hint = (" — official .bin checkpoints must be converted first: python -m infer.convert --saa SAA.bin "
                "[--imr IMR.bin] --unet-config … --out DIR") if os.path.isdir(path) else ""
        raise FileNotFoundError(f"{path} is not a converted DynamicID folder (no {MANIFEST}){hint}")
    with open(manifest) as f:
        meta = json.load(f)
    if meta.get("format") != FOLDER_FORMAT:
        raise km.WeightLoadError(f"{manifest}: unknown format {meta.get('format')!r} (expected {FOLDER_FORMAT!r})")
    id_cfg, id_params = load_converted(path, "id_encoder")
    with open(os.path.join(path, "saa.json")) as f:
        saa_meta = json.load(f)
    strategy = saa_mod.SAA(**saa_meta["strategy"])
    unet_config = UNetConfig.from_dict(saa_meta["unet_config"], source=os.path.join(path, "saa.json"))
    flat = km.read_safetensors(os.path.join(path, "saa.safetensors"))
    km.check_flat_shapes(flat, _saa_shapes(strategy, unet_config), os.path.join(path, "saa.safetensors"),
                         what="its UNet")
    saa_params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    weights = DynamicIDWeights(id_cfg, id_params, strategy, unet_config, saa_params)
    recorded = meta.get("backbone")  # folders written before SDXL support have none: SD1.x, as their UNet says
    if recorded is not None and recorded != weights.backbone:
        raise km.WeightLoadError(f"{manifest} says backbone {recorded!r}, but its SAA weights belong to a "
                                 f"{weights.backbone} UNet")
    if "imr" in meta.get("parts", []):
        weights.imr_config, weights.imr_params = load_converted(path, "imr")
        weights.keypoint_encoder_config, weights.keypoint_encoder_variables = load_converted(path, "keypoint_encoder")
    return weights


def check_saa_shapes(saa_params: Any, strategy: saa_mod.SAA, unet_config: UNetConfig, what: str) -> None:
    """Every SAA key and shape of ``saa_params`` against what ``strategy`` builds on ``unet_config`` (``what``
    names the weights in the error)."""
    km.check_flat_shapes(_flat(saa_params), _saa_shapes(strategy, unet_config), source=what, what="its UNet")


# =========================================================================================================
# One part of the folder: safetensors + JSON config (the ID encoder, the IMR, the KeyPointEncoder)
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
    return _flat_shapes(tree)


def save_converted(params, config, out_dir: str, *, name: str | None = None) -> str:
    """Write ``params`` (or ``{"params", "batch_stats"}`` for the KeyPointEncoder) to ``<out_dir>/<name>.safetensors``
    and ``config`` to ``<out_dir>/<name>.json``; both atomically (temp file + rename), JSON last. Returns the
    safetensors path. ``name`` defaults to ``id_encoder`` / ``imr`` / ``keypoint_encoder``."""
    kind = type(config).__name__
    if kind not in _CONFIG_KINDS:
        raise ValueError(f"save_converted: unsupported config type {kind}; expected one of {sorted(_CONFIG_KINDS)}")
    name = name or _CONFIG_KINDS[kind][1]
    flat = _flat(params)
    km.check_flat_shapes(flat, _expected_flat_shapes(config), f"save_converted({name})")
    os.makedirs(out_dir, exist_ok=True)
    weights_path = os.path.join(out_dir, f"{name}.safetensors")
    km.write_safetensors(flat, weights_path, metadata={"format": _FORMAT, "config_kind": kind})
    _write_json(os.path.join(out_dir, f"{name}.json"), {"format": _FORMAT, "kind": kind, "config": config.to_dict()})
    return weights_path


def load_converted(out_dir: str, name: str) -> tuple[Any, dict]:
    """Read what :func:`save_converted` wrote → ``(config, params)`` (a ``{"params", "batch_stats"}`` dict for the
    KeyPointEncoder). Checks every key and shape against the model the config describes."""
    meta, weights_path = read_part(out_dir, name, f"converted weights named {name!r}")
    if meta.get("format") != _FORMAT or meta.get("kind") not in _CONFIG_KINDS:
        raise km.WeightLoadError(f"{os.path.join(out_dir, name + '.json')} is not a dynamicid-jax converted-weights "
                                 f"config (format {meta.get('format')!r}, kind {meta.get('kind')!r})")
    config = _CONFIG_KINDS[meta["kind"]][0].from_dict(meta["config"])
    flat = km.read_safetensors(weights_path)
    km.check_flat_shapes(flat, _expected_flat_shapes(config), weights_path)
    return config, traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
