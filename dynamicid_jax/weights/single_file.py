"""Single-file (original LDM) Stable Diffusion checkpoints ↔ diffusers / transformers names.

A single file (``v1-5-pruned.safetensors``, Realistic Vision V6.0 B1 …) holds three models under three prefixes:

* ``model.diffusion_model.`` — the UNet in the original layout (``input_blocks`` / ``middle_block`` /
  ``output_blocks`` / ``time_embed`` / ``out``),
* ``first_stage_model.`` — the VAE (``encoder.down.N.block.M``, ``mid.block_1``, ``mid.attn_1.q`` …, 1×1 convs
  where diffusers has Linear layers),
* ``cond_stage_model.transformer.`` — the CLIP text model in Hugging Face names (older files omit
  ``text_model.``).

This module is pure key renaming (plus the VAE attention reshape), driven by the diffusers configs: it turns
such a file into the state dicts of diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL`` and of
``transformers.CLIPTextModel`` (:func:`split_ldm_checkpoint`), and back (:func:`to_ldm_checkpoint`). The built-in
SD1.5 configs (:func:`sd15_configs`) stand in when a file carries none.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np

from dynamicid_jax.weights.builtin_configs import (  # noqa: F401  (re-exported: the configs single files get)
    SD15_SCHEDULER_CONFIG,
    SD15_TEXT_ENCODER_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    sd15_configs,
)
from dynamicid_jax.weights.keymap import WeightLoadError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
TEXT_MODEL = "text_model."

def _shorten(items: list[str], limit: int = 20) -> str:
    more = f"\n    … and {len(items) - limit} more" if len(items) > limit else ""
    return "\n".join(f"    {i}" for i in items[:limit]) + more


# --------------------------------------------------------------------------------------------------------
# Module tables
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Module:
    """One module's name on both sides. ``parts`` lists (diffusers sub-name, LDM sub-name) pairs; ``()`` means
    the module itself holds ``weight``/``bias``; ``None`` means identical names inside (transformers)."""

    diffusers: str
    ldm: str
    parts: tuple[tuple[str, str], ...] | None = ()
    conv_as_linear: bool = False  # diffusers Linear [o, i] ↔ LDM 1×1 conv [o, i, 1, 1] (VAE attention)


_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
               ("conv_shortcut", "nin_shortcut"))
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_LEAVES = ("weight", "bias")

# UNet options that add modules this map does not know (SDXL / upscaler / LCM embeddings …).
_UNET_UNSUPPORTED = ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type", "num_class_embeds",
                     "time_cond_proj_dim")


def _as_dict(config: Any, what: str) -> Mapping[str, Any]:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ValueError(f"{what} config must be a diffusers config dict, got {type(config).__name__}")
    return config


def _layers_per_block(cfg: Mapping[str, Any], what: str) -> int:
    lpb = cfg.get("layers_per_block", 2)
    if isinstance(lpb, bool) or not isinstance(lpb, int) or lpb < 1:
        raise ValueError(f"{what} config: layers_per_block must be one positive int for the single-file map, "
                         f"got {lpb!r}")
    return lpb


def unet_modules(unet_config: Any) -> list[_Module]:
    """Every UNet module with its diffusers and LDM names, from a diffusers ``unet/config.json`` dict."""
    cfg = _as_dict(unet_config, "UNet")
    for key in _UNET_UNSUPPORTED:
        if key == "addition_embed_type" and cfg.get(key) == "text_time":
            continue  # SDXL: add_embedding ↔ label_emb.0 (below)
        if cfg.get(key) is not None:
            raise ValueError(f"UNet config: {key}={cfg[key]!r} is not supported by the single-file key map "
                             f"(SD1.x / SD2.x UNets only)")
    lpb = _layers_per_block(cfg, "UNet")
    down = list(cfg.get("down_block_types", SD15_UNET_CONFIG["down_block_types"]))
    up = list(cfg.get("up_block_types", SD15_UNET_CONFIG["up_block_types"]))
    n = len(cfg.get("block_out_channels", SD15_UNET_CONFIG["block_out_channels"]))
    if len(down) != n or len(up) != n:
        raise ValueError(f"UNet config: {n} block_out_channels but {len(down)} down / {len(up)} up block types")
    bad = [t for t in down if t not in ("CrossAttnDownBlock2D", "DownBlock2D")]
    bad += [t for t in up if t not in ("CrossAttnUpBlock2D", "UpBlock2D")]
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":
        bad.append(mid)
    if bad:
        raise ValueError(f"UNet config: block types {bad} are not supported by the single-file key map")

    mods = [_Module("conv_in", "input_blocks.0.0"),
            _Module("time_embedding.linear_1", "time_embed.0"), _Module("time_embedding.linear_2", "time_embed.2"),
            _Module("conv_norm_out", "out.0"), _Module("conv_out", "out.2")]
    if cfg.get("addition_embed_type") == "text_time":  # SDXL's pooled-text + micro-conditioning embedding
        mods += [_Module("add_embedding.linear_1", "label_emb.0.0"), _Module("add_embedding.linear_2", "label_emb.0.2")]
    idx = 1
    for i, kind in enumerate(down):
        for j in range(lpb):
            mods.append(_Module(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", _UNET_RESNET))
            if kind == "CrossAttnDownBlock2D":
                mods.append(_Module(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", None))
            idx += 1
        if i < n - 1:
            mods.append(_Module(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{idx}.0.op"))
            idx += 1
    mods += [_Module("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
             _Module("mid_block.attentions.0", "middle_block.1", None),
             _Module("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)]
    idx = 0
    for i, kind in enumerate(up):
        attn = kind == "CrossAttnUpBlock2D"
        for j in range(lpb + 1):
            mods.append(_Module(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", _UNET_RESNET))
            if attn:
                mods.append(_Module(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", None))
            if j == lpb and i < n - 1:
                mods.append(_Module(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{idx}.{2 if attn else 1}.conv"))
            idx += 1
    return mods


def vae_modules(vae_config: Any) -> list[_Module]:
    """Every VAE module with its diffusers and LDM names, from a diffusers ``vae/config.json`` dict."""
    cfg = _as_dict(vae_config, "VAE")
    lpb = _layers_per_block(cfg, "VAE")
    n = len(cfg.get("block_out_channels", SD15_VAE_CONFIG["block_out_channels"]))
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(cfg.get(key, [want] * n))
        if len(types) != n or any(t != want for t in types):
            raise ValueError(f"VAE config: {key}={types!r} is not supported (expected {n} × {want!r})")
    mods = []
    for side in ("encoder", "decoder"):
        mods += [_Module(f"{side}.conv_in", f"{side}.conv_in"), _Module(f"{side}.conv_out", f"{side}.conv_out"),
                 _Module(f"{side}.conv_norm_out", f"{side}.norm_out"),
                 _Module(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET),
                 _Module(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET)]
        if cfg.get("mid_block_add_attention", True):
            mods.append(_Module(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", _VAE_ATTENTION,
                                conv_as_linear=True))
    for i in range(n):
        for j in range(lpb):
            mods.append(_Module(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        if i < n - 1:
            mods.append(_Module(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        level = n - 1 - i  # the LDM decoder numbers its levels from the highest resolution
        for j in range(lpb + 1):
            mods.append(_Module(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET))
        if i < n - 1:
            mods.append(_Module(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv"))
    if cfg.get("use_quant_conv", True):
        mods.append(_Module("quant_conv", "quant_conv"))
    if cfg.get("use_post_quant_conv", True):
        mods.append(_Module("post_quant_conv", "post_quant_conv"))
    return mods


class _Renamer:
    """Longest-prefix lookup of module names in one direction, with the sub-name and reshape rules."""

    def __init__(self, modules: Iterable[_Module], *, to_ldm: bool):
        self.to_ldm = to_ldm
        self.modules = list(modules)
        self.table = {(m.diffusers if to_ldm else m.ldm): m for m in self.modules}

    def rename(self, key: str, value: Any) -> tuple[str, Any, _Module] | None:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = self.table.get(".".join(parts[:cut]))
            if module is not None:
                break
        else:
            return None
        rest = ".".join(parts[cut:])
        dst = module.ldm if self.to_ldm else module.diffusers
        if module.parts is None:
            return f"{dst}.{rest}", value, module
        if module.parts == ():
            return (f"{dst}.{rest}", value, module) if rest in _LEAVES else None
        for diffusers_sub, ldm_sub in module.parts:
            src_sub, dst_sub = (diffusers_sub, ldm_sub) if self.to_ldm else (ldm_sub, diffusers_sub)
            if rest.startswith(src_sub + ".") and rest[len(src_sub) + 1:] in _LEAVES:
                leaf = rest[len(src_sub) + 1:]
                if module.conv_as_linear and leaf == "weight" and diffusers_sub != "group_norm":
                    value = _conv_linear(value, to_conv=self.to_ldm)
                return f"{dst}.{dst_sub}.{leaf}", value, module
        return None


def _conv_linear(value: Any, *, to_conv: bool) -> Any:
    if to_conv:
        return value[:, :, None, None] if value.ndim == 2 else value
    if value.ndim == 4:
        return value[:, :, 0, 0]
    if value.ndim == 3:
        return value[:, :, 0]
    return value


def _convert(state: Mapping[str, Any], modules: list[_Module], *, to_ldm: bool, what: str,
             src_prefix: str = "", dst_prefix: str = "") -> dict[str, Any]:
    """Rename every key of ``state`` (all must start with ``src_prefix``); raise on unknown keys and on modules
    of the config that received no weights."""
    renamer = _Renamer(modules, to_ldm=to_ldm)
    out, unknown, seen = {}, [], set()
    for key, value in state.items():
        hit = renamer.rename(key[len(src_prefix):], value)
        if hit is None:
            unknown.append(key)
            continue
        new_key, new_value, module = hit
        out[dst_prefix + new_key] = new_value
        seen.add(module)
    missing = [f"{src_prefix}{m.diffusers if to_ldm else m.ldm}" for m in modules if m not in seen]
    if unknown or missing:
        msg = [f"{what}: the state dict does not match the config's layout:"]
        if unknown:
            msg.append(f"  {len(unknown)} key(s) with no place in the config's layout:\n{_shorten(sorted(unknown))}")
        if missing:
            msg.append(f"  {len(missing)} module(s) of the config with no weights:\n{_shorten(missing)}")
        raise WeightLoadError("\n".join(msg))
    return out


# --------------------------------------------------------------------------------------------------------
# Text encoder names
# --------------------------------------------------------------------------------------------------------
_CLIP_TOP = ("embeddings.", "encoder.", "final_layer_norm.")


def _text_from_ldm(state: Mapping[str, Any], text_prefix: str) -> tuple[dict[str, Any], list[str]]:
    out, unknown = {}, []
    for key, value in state.items():
        rest = key[len(TEXT_PREFIX):]
        rest = rest[len(TEXT_MODEL):] if rest.startswith(TEXT_MODEL) else rest
        if not rest.startswith(_CLIP_TOP):
            unknown.append(key)
            continue
        out[text_prefix + rest] = value
    return out, unknown


def _text_to_ldm(state: Mapping[str, Any]) -> dict[str, Any]:
    out, unknown = {}, []
    for key, value in state.items():
        rest = key[len(TEXT_MODEL):] if key.startswith(TEXT_MODEL) else key
        if rest == "embeddings.position_ids":
            continue
        if not rest.startswith(_CLIP_TOP):
            unknown.append(key)
            continue
        out[f"{TEXT_PREFIX}{TEXT_MODEL}{rest}"] = value
    if unknown:
        raise WeightLoadError(f"text encoder: {len(unknown)} key(s) are not CLIPTextModel weights:\n"
                              f"{_shorten(sorted(unknown))}")
    return out


# --------------------------------------------------------------------------------------------------------
# Keys that are not model weights
# --------------------------------------------------------------------------------------------------------
_IGNORED = (
    re.compile(r"^model_ema\."),  # EMA copies of the UNet (and their bookkeeping)
    re.compile(r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
               r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|"
               r"posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|"
               r"logvar|lvlb_weights)$"),  # the LDM wrapper's DDPM buffers
    re.compile(r"^cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids$"),  # a buffer
    re.compile(r"^first_stage_model\.loss\."),  # training-only LPIPS / discriminator
)


def is_ignored_key(key: str) -> bool:
    """True for keys of a single file that hold no weights we load (EMA, DDPM buffers, position ids …)."""
    return any(p.search(key) for p in _IGNORED)


def _component(key: str) -> str | None:
    for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text_encoder", TEXT_PREFIX)):
        if key.startswith(prefix):
            return name
    return None


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------
def split_ldm_checkpoint(state: Mapping[str, Any], unet_config: Any = None, vae_config: Any = None, *,
                         text_prefix: str = TEXT_MODEL) -> dict[str, dict[str, Any]]:
    """LDM-named ``state`` → ``{"unet", "vae", "text_encoder"}`` state dicts in diffusers / transformers names.

    ``unet_config`` / ``vae_config`` are diffusers config dicts (``None`` → the SD1.5 ones). VAE attention 1×1
    conv weights become Linear weights. Text-encoder keys come out as ``text_model.embeddings…`` (the names of
    SD1.5's ``text_encoder/model.safetensors``; ``text_prefix=""`` drops the prefix). A component absent from the
    file gives an empty dict; non-weight keys (:func:`is_ignored_key`) are skipped; any other key that does not
    fit the configs raises :class:`WeightLoadError` listing it."""
    unet_config = SD15_UNET_CONFIG if unet_config is None else unet_config
    vae_config = SD15_VAE_CONFIG if vae_config is None else vae_config
    groups: dict[str, dict[str, Any]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    stray = []
    for key, value in state.items():
        if is_ignored_key(key):
            continue
        name = _component(key)
        if name is None:
            stray.append(key)
        else:
            groups[name][key] = value
    out: dict[str, dict[str, Any]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    if groups["unet"]:
        out["unet"] = _convert(groups["unet"], unet_modules(unet_config), to_ldm=False, what="UNet",
                               src_prefix=UNET_PREFIX)
    if groups["vae"]:
        out["vae"] = _convert(groups["vae"], vae_modules(vae_config), to_ldm=False, what="VAE",
                              src_prefix=VAE_PREFIX)
    if groups["text_encoder"]:
        out["text_encoder"], unknown = _text_from_ldm(groups["text_encoder"], text_prefix)
        stray += unknown
    if stray:
        raise WeightLoadError(f"{len(stray)} key(s) of the checkpoint belong to no SD1.x component "
                              f"(SD2 / SDXL text encoders, LoRA, … are not supported here):\n"
                              f"{_shorten(sorted(stray))}")
    return out


def to_ldm_checkpoint(unet_sd: Mapping[str, Any] | None, vae_sd: Mapping[str, Any] | None,
                      text_sd: Mapping[str, Any] | None, unet_config: Any = None,
                      vae_config: Any = None) -> dict[str, Any]:
    """The inverse of :func:`split_ldm_checkpoint`: diffusers / transformers state dicts → one LDM-named dict.

    Any of the three may be ``None`` (left out). Text keys may carry ``text_model.`` or not; they are written
    as ``cond_stage_model.transformer.text_model.…``. Values are passed through (numpy or torch), except VAE
    attention Linear weights, which become 1×1 conv weights."""
    unet_config = SD15_UNET_CONFIG if unet_config is None else unet_config
    vae_config = SD15_VAE_CONFIG if vae_config is None else vae_config
    out: dict[str, Any] = {}
    if unet_sd:
        out.update(_convert(unet_sd, unet_modules(unet_config), to_ldm=True, what="UNet", dst_prefix=UNET_PREFIX))
    if vae_sd:
        out.update(_convert(vae_sd, vae_modules(vae_config), to_ldm=True, what="VAE", dst_prefix=VAE_PREFIX))
    if text_sd:
        out.update(_text_to_ldm(text_sd))
    return out


@dataclasses.dataclass
class SingleFileCheckpoint:
    """What :func:`read_single_file` found: the weights under the three LDM prefixes (fp32 numpy where the file
    holds fp16/bf16), the keys skipped as non-weights, and the keys it did not recognise."""

    path: str
    state: dict[str, np.ndarray]
    ignored: list[str]
    unexpected: list[str]
    metadata: dict[str, str]

    @property
    def components(self) -> list[str]:
        return sorted({c for c in map(_component, self.state) if c is not None})


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _st_dtype(name: str):
    if name == "BF16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if name not in _ST_DTYPES:
        raise WeightLoadError(f"unsupported safetensors dtype {name}")
    return _ST_DTYPES[name]


def _read_header(path: str) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightLoadError(f"{path} is not a .safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > os.path.getsize(path) - 8:
            raise WeightLoadError(f"{path} is not a .safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightLoadError(f"{path} is not a .safetensors file (unreadable header: {e})") from e
    if not isinstance(header, dict):
        raise WeightLoadError(f"{path} is not a .safetensors file (header is not an object)")
    return 8 + n, header


def read_single_file(path: str, *, strict: bool = True, component_of=None,
                     family: str = "SD1.x") -> SingleFileCheckpoint:
    """Read an original-LDM ``.safetensors`` checkpoint, loading only the model weights (memory-mapped, so EMA
    copies cost nothing). ``strict`` raises :class:`WeightLoadError` listing keys that are neither weights of
    the three components nor known non-weights (:func:`is_ignored_key`); otherwise they are only listed in
    ``.unexpected``. ``component_of`` (key → component name or ``None``) and ``family`` (for messages) let other
    layouts (SDXL's, :mod:`.single_file_sdxl`) reuse the reader."""
    component_of = _component if component_of is None else component_of
    if not os.path.exists(path):
        raise FileNotFoundError(f"single-file checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder; a single-file checkpoint is one .safetensors file "
                                f"(diffusers folders have their own loaders)")
    if path.endswith((".ckpt", ".pt", ".pth", ".bin")):
        raise WeightLoadError(f"{path}: pickled PyTorch checkpoints are not read (no torch at runtime); convert "
                              f"the file to .safetensors first")
    offset, header = _read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    state, ignored, unexpected = {}, [], []
    for key in sorted(header):
        if is_ignored_key(key):
            ignored.append(key)
            continue
        if component_of(key) is None:
            unexpected.append(key)
            continue
        info = header[key]
        start, end = info["data_offsets"]
        array = raw[offset + start: offset + end].view(_st_dtype(info["dtype"])).reshape(info["shape"])
        if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
            array = array.astype(np.float32)
        else:
            array = np.array(array)
        state[key] = array
    del raw
    if strict and unexpected:
        raise WeightLoadError(f"{path}: {len(unexpected)} key(s) are not {family} single-file weights (other "
                              f"text encoders, LoRA, …):\n{_shorten(unexpected)}")
    if not state:
        raise WeightLoadError(f"{path} holds no {family} weights ({UNET_PREFIX}*, {VAE_PREFIX}*, …): it is "
                              f"not an original-LDM single-file checkpoint of that family")
    return SingleFileCheckpoint(path, state, ignored, unexpected, metadata)


def load_single_file_components(path: str, unet_config: Any = None, vae_config: Any = None, *,
                                strict: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """:func:`read_single_file` + :func:`split_ldm_checkpoint`: diffusers-named state dicts per component."""
    ckpt = read_single_file(path, strict=strict)
    try:
        return split_ldm_checkpoint(ckpt.state, unet_config, vae_config)
    except WeightLoadError as e:
        raise WeightLoadError(f"{path}: {e}") from None
