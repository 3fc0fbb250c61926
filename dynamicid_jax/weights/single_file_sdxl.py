"""Single-file SDXL checkpoints (the ``generative-models`` layout of ``sd_xl_base_1.0.safetensors``) ↔ diffusers.

An SDXL single file holds four models under four prefixes:

* ``model.diffusion_model.`` — the UNet in the original layout; the same renaming as SD1.x
  (:func:`~dynamicid_jax.weights.single_file.unet_modules`) plus ``label_emb.0.{0,2}`` ↔ ``add_embedding.linear_{1,2}``
  (the pooled-text + micro-conditioning embedding);
* ``first_stage_model.`` — the VAE, as in SD1.x;
* ``conditioner.embedders.0.transformer.`` — the first text encoder (CLIP ViT-L/14) in Hugging Face names;
* ``conditioner.embedders.1.model.`` — the second text encoder (OpenCLIP ViT-bigG/14's text tower) in OpenCLIP
  names: ``transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}``, ``token_embedding``,
  ``positional_embedding``, ``ln_final`` and ``text_projection`` (``[width, proj]``, used as ``x @ P``; the
  transpose of transformers' ``text_projection.weight``). Its attention keeps q, k and v in one fused
  ``in_proj_weight [3·width, width]`` / ``in_proj_bias``, split here into ``q_proj``/``k_proj``/``v_proj``.

:func:`split_sdxl_checkpoint` maps such a state dict to the four diffusers / transformers state dicts and
:func:`to_sdxl_checkpoint` maps them back (how the tests write an SDXL single file from a folder).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from dynamicid_jax.weights import single_file as sf
from dynamicid_jax.weights.builtin_configs import (  # noqa: F401  (re-exported: the configs single files get)
    SDXL_SCHEDULER_CONFIG,
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_TEXT_ENCODER_CONFIG,
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    sdxl_configs,
)
from dynamicid_jax.weights.keymap import WeightLoadError

TEXT_PREFIX = "conditioner.embedders.0.transformer."
TEXT_2_PREFIX = "conditioner.embedders.1.model."
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

# --------------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------------
_IGNORED = (
    re.compile(r"^conditioner\.embedders\.1\.model\.(logit_scale|attn_mask)$"),  # CLIP's contrastive scale, a buffer
    re.compile(r"^conditioner\.embedders\.0\.transformer\.(text_model\.)?embeddings\.position_ids$"),
    re.compile(r"^denoiser\."),  # the sgm denoiser's sigma table (a buffer)
)


def is_ignored_key(key: str) -> bool:
    """Keys of an SDXL single file that hold no weights we load (EMA, buffers, CLIP's logit scale …)."""
    return sf.is_ignored_key(key) or any(p.search(key) for p in _IGNORED)


def component_of(key: str) -> str | None:
    """Which SDXL component a single-file key belongs to (``None``: not a model weight of SDXL)."""
    for name, prefix in (("unet", sf.UNET_PREFIX), ("vae", sf.VAE_PREFIX), ("text_encoder", TEXT_PREFIX),
                         ("text_encoder_2", TEXT_2_PREFIX)):
        if key.startswith(prefix):
            return name
    return None


def looks_like_sdxl(keys) -> bool:
    """True for the key set of an SDXL single file (it has the OpenCLIP bigG text tower's keys)."""
    return any(k.startswith(TEXT_2_PREFIX) for k in keys)


# OpenCLIP text tower (inside ``conditioner.embedders.1.model.``) ↔ transformers CLIPTextModelWithProjection.
_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",  # transposed
}
_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj(?=_)|.+(?=\.))[._](weight|bias)$")
_HF_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_CLIP_TOP = ("embeddings.", "encoder.", "final_layer_norm.")


def openclip_to_transformers(state: Mapping[str, Any]) -> dict[str, Any]:
    """OpenCLIP text-tower keys (without the ``conditioner.embedders.1.model.`` prefix) → transformers
    ``CLIPTextModelWithProjection`` keys; the fused ``attn.in_proj_*`` is split into q, k, v."""
    out, unknown = {}, []
    for key, value in state.items():
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = np.asarray(value).T if key == "text_projection" else value
            continue
        m = _RESBLOCK.match(key)
        if m is None:
            unknown.append(key)
            continue
        layer, module, leaf = m.groups()
        base = f"text_model.encoder.layers.{layer}"
        if module == "attn.in_proj":
            q, k, v = np.split(np.asarray(value), 3, axis=0)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{base}.self_attn.{name}.{leaf}"] = part
        elif module in _OPENCLIP_BLOCK:
            out[f"{base}.{_OPENCLIP_BLOCK[module]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        listed = sf._shorten(sorted(TEXT_2_PREFIX + k for k in unknown))
        raise WeightLoadError(f"text encoder 2: {len(unknown)} OpenCLIP key(s) with no place in a "
                              f"CLIPTextModelWithProjection:\n{listed}")
    return out


def transformers_to_openclip(state: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`openclip_to_transformers` (keys without the prefix); q, k, v are fused again."""
    state = {("text_model." + k if k.startswith(_CLIP_TOP) else k): v for k, v in state.items()
             if not k.endswith("embeddings.position_ids")}
    top = {hf: oc for oc, hf in _OPENCLIP_TOP.items()}
    block = {hf: oc for oc, hf in _OPENCLIP_BLOCK.items()}
    out, unknown, fused = {}, [], {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = np.asarray(value).T if key == "text_projection.weight" else value
            continue
        m = _HF_LAYER.match(key)
        if m is None:
            unknown.append(key)
            continue
        layer, module, leaf = m.groups()
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj", module)
        if qkv:
            fused.setdefault((layer, leaf), {})[qkv.group(1)] = np.asarray(value)
        elif module in block:
            out[f"transformer.resblocks.{layer}.{block[module]}.{leaf}"] = value
        else:
            unknown.append(key)
    for (layer, leaf), parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            unknown.append(f"text_model.encoder.layers.{layer}.self_attn (only {sorted(parts)} of q, k, v)")
            continue
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = np.concatenate(
            [parts["q"], parts["k"], parts["v"]], axis=0)
    if unknown:
        raise WeightLoadError(f"text encoder 2: {len(unknown)} key(s) are not CLIPTextModelWithProjection "
                              f"weights:\n{sf._shorten(sorted(unknown))}")
    return out


def _text_from_ldm(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        rest = key[len(TEXT_PREFIX):]
        rest = rest[len(sf.TEXT_MODEL):] if rest.startswith(sf.TEXT_MODEL) else rest
        if not rest.startswith(_CLIP_TOP):
            raise WeightLoadError(f"text encoder: {key} is not a CLIPTextModel weight")
        out[sf.TEXT_MODEL + rest] = value
    return out


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------
def split_sdxl_checkpoint(state: Mapping[str, Any], unet_config: Any = None,
                          vae_config: Any = None) -> dict[str, dict[str, Any]]:
    """SDXL single-file ``state`` → ``{"unet", "vae", "text_encoder", "text_encoder_2"}`` state dicts in diffusers
    / transformers names (``None`` configs: SDXL base 1.0's). A component absent from the file gives an empty
    dict; keys that fit no component raise :class:`WeightLoadError` listing them."""
    unet_config = SDXL_UNET_CONFIG if unet_config is None else unet_config
    vae_config = SDXL_VAE_CONFIG if vae_config is None else vae_config
    groups: dict[str, dict[str, Any]] = {name: {} for name in COMPONENTS}
    stray = []
    for key, value in state.items():
        if is_ignored_key(key):
            continue
        name = component_of(key)
        (stray.append(key) if name is None else groups[name].__setitem__(key, value))
    if stray:
        raise WeightLoadError(f"{len(stray)} key(s) of the checkpoint belong to no SDXL component:\n"
                              f"{sf._shorten(sorted(stray))}")
    out: dict[str, dict[str, Any]] = {name: {} for name in COMPONENTS}
    if groups["unet"]:
        out["unet"] = sf._convert(groups["unet"], sf.unet_modules(unet_config), to_ldm=False, what="UNet",
                                  src_prefix=sf.UNET_PREFIX)
    if groups["vae"]:
        out["vae"] = sf._convert(groups["vae"], sf.vae_modules(vae_config), to_ldm=False, what="VAE",
                                 src_prefix=sf.VAE_PREFIX)
    if groups["text_encoder"]:
        out["text_encoder"] = _text_from_ldm(groups["text_encoder"])
    if groups["text_encoder_2"]:
        out["text_encoder_2"] = openclip_to_transformers(
            {k[len(TEXT_2_PREFIX):]: v for k, v in groups["text_encoder_2"].items()})
    return out


def to_sdxl_checkpoint(unet_sd: Mapping[str, Any] | None, vae_sd: Mapping[str, Any] | None,
                       text_sd: Mapping[str, Any] | None, text_2_sd: Mapping[str, Any] | None,
                       unet_config: Any = None, vae_config: Any = None) -> dict[str, Any]:
    """The inverse of :func:`split_sdxl_checkpoint`: diffusers / transformers state dicts → one SDXL single-file
    dict (any of the four may be ``None``)."""
    unet_config = SDXL_UNET_CONFIG if unet_config is None else unet_config
    vae_config = SDXL_VAE_CONFIG if vae_config is None else vae_config
    out: dict[str, Any] = {}
    if unet_sd:
        out.update(sf._convert(unet_sd, sf.unet_modules(unet_config), to_ldm=True, what="UNet",
                               dst_prefix=sf.UNET_PREFIX))
    if vae_sd:
        out.update(sf._convert(vae_sd, sf.vae_modules(vae_config), to_ldm=True, what="VAE",
                               dst_prefix=sf.VAE_PREFIX))
    if text_sd:
        # the SD1.x text renaming, moved from cond_stage_model.transformer. to SDXL's first embedder
        out.update({TEXT_PREFIX + k[len(sf.TEXT_PREFIX):]: v for k, v in sf._text_to_ldm(text_sd).items()})
    if text_2_sd:
        out.update({TEXT_2_PREFIX + k: v for k, v in transformers_to_openclip(text_2_sd).items()})
    return out


def is_sdxl_single_file(path: str) -> bool:
    """True when the ``.safetensors`` file at ``path`` has SDXL's second text encoder (reads the header only)."""
    _, header = sf._read_header(path)
    return looks_like_sdxl(header)


def load_sdxl_single_file_components(path: str, unet_config: Any = None, vae_config: Any = None, *,
                                     strict: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Read an SDXL single file (memory-mapped) and split it into diffusers-named state dicts per component."""
    ckpt = sf.read_single_file(path, strict=strict, component_of=component_of, family="SDXL")
    state = {k: v for k, v in ckpt.state.items() if not is_ignored_key(k)}
    try:
        return split_sdxl_checkpoint(state, unet_config, vae_config)
    except WeightLoadError as e:
        raise WeightLoadError(f"{path}: {e}") from None
