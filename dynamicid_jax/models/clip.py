"""CLIP text and vision towers (transformers' ``CLIPTextModel`` / ``CLIPVisionModelWithProjection``) in Flax linen.

* :class:`CLIPTextModel` — the SD1.5 prompt encoder (CLIP ViT-L/14 text): token + position embeddings, a pre-LN
  transformer with a causal mask, a final LayerNorm; ``pooler_output`` is the hidden state at the EOS token.
* :class:`CLIPVisionModelWithProjection` — the image encoder (ViT-H/14 for DynamicID's ID encoder, which reads the
  **penultimate** hidden states ``hidden_states[-2]``, ``[B, 257, 1280]``); pixels are NHWC and already
  normalised by :func:`clip_preprocess`.

Module names mirror the torch module names, so each :class:`~dynamicid_jax.weights.keymap.KeyMap` is a couple of
rules, and :func:`load_text_encoder` / :func:`load_image_encoder` read a transformers folder (``config.json`` +
``model.safetensors`` or a sharded ``model.safetensors.index.json``) without torch.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, ClassVar, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax.models.configs import CLIPTextConfig, CLIPVisionConfig, text_config, vision_config
from dynamicid_jax.models.layers import Dtype, activation, conv, dense, dot_product_attention, embed, layer_norm
from dynamicid_jax.weights import keymap as km
from dynamicid_jax.weights.keymap import KeyMap, RenamedStateDict, load_state_dict

SEQ_AXES = ("activation_batch", "activation_length", "activation_embed")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------
class CLIPAttention(nn.Module):
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        b, length, width = x.shape
        head_dim = width // self.num_heads

        def project(name: str) -> jax.Array:
            return dense(width, name=name, dtype=self.dtype)(x).reshape(b, length, self.num_heads, head_dim)

        out = dot_product_attention(project("q_proj"), project("k_proj"), project("v_proj"), mask=mask,
                                    scale=head_dim ** -0.5)
        return dense(width, name="out_proj", dtype=self.dtype, axes=("mlp", "embed"))(out.reshape(b, length, width))


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = activation(self.hidden_act)(dense(self.intermediate_size, name="fc1", dtype=self.dtype)(x))
        return dense(x.shape[-1], name="fc2", dtype=self.dtype, axes=("mlp", "embed"))(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: ``x + attn(LN₁ x)`` then ``x + mlp(LN₂ x)``."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        c = self.config
        eps = c.layer_norm_eps
        x = x + CLIPAttention(c.num_attention_heads, self.dtype, name="self_attn")(
            layer_norm(eps, name="layer_norm1", dtype=self.dtype)(x), mask)
        x = x + CLIPMLP(c.intermediate_size, c.hidden_act, self.dtype, name="mlp")(
            layer_norm(eps, name="layer_norm2", dtype=self.dtype)(x))
        return nn.with_logical_constraint(x, SEQ_AXES)


class CLIPEncoder(nn.Module):
    """``num_hidden_layers`` blocks; returns the output and every hidden state (the input first)."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, mask)
            states.append(x)
        return x, tuple(states)


@flax.struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array  # [B, L, D], after final_layer_norm
    pooler_output: jax.Array  # [B, D], last_hidden_state at the EOS token
    hidden_states: tuple[jax.Array, ...] | None = None  # embeddings + each layer (before final_layer_norm)
    text_embeds: jax.Array | None = None  # [B, projection_dim]: text_projection(pooled), WithProjection only


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        tokens = embed(c.vocab_size, c.hidden_size, name="token_embedding", dtype=self.dtype)(input_ids)
        positions = embed(c.max_position_embeddings, c.hidden_size, name="position_embedding",
                          dtype=self.dtype)(jnp.arange(input_ids.shape[1])[None])
        return tokens + positions


class CLIPTextModel(nn.Module):
    """transformers' ``CLIPTextModel``: ``apply({"params": p}, input_ids [B, L] int)`` → :class:`CLIPTextOutput`."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    projects: ClassVar[bool] = False  # True in CLIPTextModelWithProjection

    @nn.compact
    def __call__(self, input_ids: jax.Array, output_hidden_states: bool = False) -> CLIPTextOutput:
        c = self.config
        if input_ids.ndim != 2 or not 0 < input_ids.shape[1] <= c.max_position_embeddings:
            raise ValueError(f"input_ids must be [batch, length] with length <= {c.max_position_embeddings}, "
                             f"got shape {input_ids.shape}")
        input_ids = input_ids.astype(jnp.int32)
        x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
        length = input_ids.shape[1]
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        x, states = CLIPEncoder(c, self.dtype, name="encoder")(x, causal)
        last = layer_norm(c.layer_norm_eps, name="final_layer_norm", dtype=self.dtype)(x)
        if c.eos_token_id == 2:
            # legacy configs (before transformers PR #24773): the EOS token has the largest id in the sequence
            eos_index = jnp.argmax(input_ids, axis=-1)
        else:
            eos_index = jnp.argmax(input_ids == c.eos_token_id, axis=-1)  # first EOS (padding may also be EOS)
        pooled = jnp.take_along_axis(last, eos_index[:, None, None], axis=1)[:, 0]
        text_embeds = None
        if self.projects:
            text_embeds = dense(c.projection_dim, name="text_projection", use_bias=False, dtype=self.dtype,
                                axes=("embed", "mlp"))(pooled)
        return CLIPTextOutput(last, pooled, states if output_hidden_states else None, text_embeds)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' ``CLIPTextModelWithProjection`` (SDXL's second text encoder, OpenCLIP ViT-bigG/14's text
    tower): :class:`CLIPTextModel` plus a bias-free ``text_projection`` of the pooled output, returned as
    ``text_embeds`` (SDXL's pooled prompt embedding)."""

    projects: ClassVar[bool] = True


@flax.struct.dataclass
class CLIPVisionOutput:
    image_embeds: jax.Array  # [B, projection_dim]
    last_hidden_state: jax.Array  # [B, 1 + patches, D] (no post_layernorm, as in transformers)
    pooler_output: jax.Array  # [B, D], post_layernorm(CLS)
    hidden_states: tuple[jax.Array, ...] | None = None  # pre_layrnorm(embeddings) + each layer


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        class_embedding = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(c.hidden_size ** -0.5), ("embed",)),
            (c.hidden_size,), jnp.float32)
        patches = conv(c.hidden_size, c.patch_size, strides=c.patch_size, padding=0, use_bias=False,
                       name="patch_embedding", dtype=self.dtype)(pixels.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)  # row-major over (h, w), as torch's flatten(2)
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        positions = embed(c.num_positions, c.hidden_size, name="position_embedding",
                          dtype=self.dtype)(jnp.arange(c.num_positions)[None])
        return x + positions


class CLIPVisionTransformer(nn.Module):
    """The vision tower (transformers' ``CLIPVisionModel`` body); returns hidden states and the pooled CLS."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
        c = self.config
        x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixels)
        x = layer_norm(c.layer_norm_eps, name="pre_layrnorm", dtype=self.dtype)(x)  # sic: torch's name
        x, states = CLIPEncoder(c, self.dtype, name="encoder")(x)
        pooled = layer_norm(c.layer_norm_eps, name="post_layernorm", dtype=self.dtype)(x[:, 0])
        return x, pooled, states


class CLIPVisionModelWithProjection(nn.Module):
    """``apply({"params": p}, pixels [B, S, S, C] NHWC, CLIP-normalised)`` → :class:`CLIPVisionOutput`.

    ``hidden_states`` (returned by default; under ``jit`` unused outputs cost nothing) hold the embeddings after
    ``pre_layrnorm`` then every layer's output, so ``hidden_states[-2]`` is the penultimate layer.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array, output_hidden_states: bool = True) -> CLIPVisionOutput:
        c = self.config
        expected = (c.image_size, c.image_size, c.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixels must be NHWC [batch, {expected[0]}, {expected[1]}, {expected[2]}] "
                             f"(see clip_preprocess), got shape {pixels.shape}")
        last, pooled, states = CLIPVisionTransformer(c, self.dtype, name="vision_model")(pixels)
        embeds = dense(c.projection_dim, name="visual_projection", use_bias=False, dtype=self.dtype,
                       axes=("embed", "mlp"))(pooled)
        return CLIPVisionOutput(embeds, last, pooled, states if output_hidden_states else None)


# --------------------------------------------------------------------------------------------------------
# Key maps and loaders
# --------------------------------------------------------------------------------------------------------
TEXT_KEYMAP = KeyMap(list_names=("layers",), renames=((r"^", "text_model."),), ignore=(r"position_ids$",))
# CLIPTextModelWithProjection: the tower under ``text_model.``, the projection at the top level.
TEXT_PROJECTION_KEYMAP = KeyMap(list_names=("layers",), renames=((r"^(?!text_projection\.)", "text_model."),),
                                ignore=(r"position_ids$",))
VISION_KEYMAP = KeyMap(list_names=("layers",), bare_params=("class_embedding",), ignore=(r"position_ids$",))

# Keys of the other tower / heads that a full CLIPModel (or a *WithProjection) checkpoint also holds.
_NOT_TEXT = re.compile(r"^(vision_model\.|visual_projection\.|text_projection\.|logit_scale$)")
_NOT_VISION = re.compile(r"^(text_model\.|text_projection\.|logit_scale$)")
_TEXT_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


def canonical_text_state(state: Mapping[str, np.ndarray], *,
                         keep_projection: bool = False) -> Mapping[str, np.ndarray]:
    """Text-tower keys in the ``text_model.*`` layout of :data:`TEXT_KEYMAP` (a view: values are read from
    ``state`` when accessed).

    transformers ≥ 5 saves a bare ``CLIPTextModel`` without the ``text_model.`` prefix; SD checkpoints written by
    older versions (and full CLIPModel files) have it. Keys of the vision tower / projections are dropped.
    """
    prefixed = any(k.startswith("text_model.") for k in state)

    def rename(key: str) -> str | None:
        if _NOT_TEXT.match(key) and not (keep_projection and key.startswith("text_projection.")):
            return None
        return "text_model." + key if not prefixed and key.startswith(_TEXT_ROOTS) else key

    return RenamedStateDict(state, rename)


def canonical_vision_state(state: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """Vision-tower + ``visual_projection`` keys; text-tower keys of a full CLIPModel file are dropped (a view)."""
    return RenamedStateDict(state, lambda k: None if _NOT_VISION.match(k) else k)


def read_weights(folder: str | os.PathLike, variant: str | None = None) -> Mapping[str, np.ndarray]:
    """All tensors of ``model[.variant].safetensors`` or of the shards listed by ``model.safetensors.index.json``."""
    return km.read_weights(folder, "model", variant=variant)[0]


def _placer(param_dtype: Dtype):
    """Each loaded leaf becomes a device array of ``param_dtype`` as soon as it is converted."""
    return lambda x: jnp.asarray(x, dtype=param_dtype)


def text_encoder_from_state_dict(state: Mapping[str, np.ndarray], config: CLIPTextConfig | Mapping[str, Any], *,
                                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                                 source: str = "state dict",
                                 with_projection: bool | None = None) -> tuple[CLIPTextModel, dict]:
    """Build the text encoder for ``config`` and load a transformers-named state dict (with or without the
    ``text_model.`` prefix) into it. ``with_projection`` (default: whether ``config`` names
    ``CLIPTextModelWithProjection`` in its ``architectures``) builds :class:`CLIPTextModelWithProjection` and loads
    ``text_projection.weight`` too."""
    if with_projection is None:
        with_projection = is_projection_config(config)
    if not isinstance(config, CLIPTextConfig):
        config = CLIPTextConfig.from_dict(config, source=f"{source} config")
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config, dtype=dtype)
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              jnp.zeros((1, config.max_position_embeddings), jnp.int32))["params"]
    params = load_state_dict(canonical_text_state(state, keep_projection=with_projection), text_keymap(model),
                             abstract, source=source, place=_placer(param_dtype))
    return model, params


def is_projection_config(config: Any) -> bool:
    """True when a transformers config dict names ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``)."""
    return isinstance(config, Mapping) and "CLIPTextModelWithProjection" in (config.get("architectures") or ())


def text_keymap(model: CLIPTextModel) -> KeyMap:
    """The key map of a text encoder module (with or without ``text_projection``)."""
    return TEXT_PROJECTION_KEYMAP if model.projects else TEXT_KEYMAP


def load_text_encoder(path: str | os.PathLike, dtype: Dtype = jnp.float32, *, param_dtype: Dtype = jnp.float32,
                      variant: str | None = None) -> tuple[CLIPTextModel, dict]:
    """``(model, params)`` from a transformers ``CLIPTextModel`` folder (e.g. a diffusers ``text_encoder/``), or a
    ``CLIPTextModelWithProjection`` folder (SDXL's ``text_encoder_2/``; its config's ``architectures`` says so).

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the returned params. A full
    ``CLIPModel`` folder works too (its text tower is used).
    """
    folder = km.find_component(path, "text_encoder", what="text encoder")
    raw = km.read_config(folder)
    config = CLIPTextConfig.from_dict(raw, source=os.path.join(folder, "config.json"))
    state, source = km.read_weights(folder, "model", variant=variant)
    return text_encoder_from_state_dict(state, config, dtype=dtype, param_dtype=param_dtype, source=source,
                                        with_projection=is_projection_config(raw))


def load_image_encoder(path: str | os.PathLike, dtype: Dtype = jnp.float32, *, param_dtype: Dtype = jnp.float32,
                       variant: str | None = None) -> tuple[CLIPVisionModelWithProjection, dict]:
    """``(model, params)`` from a ``CLIPVisionModelWithProjection`` folder or a full ``CLIPModel`` folder."""
    folder = km.find_component(path, "image_encoder", what="image encoder")
    config = CLIPVisionConfig.from_dict(km.read_config(folder), source=os.path.join(folder, "config.json"))
    model = CLIPVisionModelWithProjection(config, dtype=dtype)
    dummy = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
    state = canonical_vision_state(read_weights(folder, variant))
    params = load_state_dict(state, VISION_KEYMAP, abstract, source=str(folder), place=_placer(param_dtype))
    return model, params


def save_image_encoder(folder: str | os.PathLike, module: CLIPVisionModelWithProjection, params: Any) -> str:
    """Write ``module``/``params`` as a transformers ``CLIPVisionModelWithProjection`` folder (``config.json`` +
    ``model.safetensors``, fp32) that :func:`load_image_encoder` and ``transformers`` both read. The folder
    appears complete or not at all (written to a temporary sibling, then renamed); an existing folder is replaced.
    Returns the folder."""
    import json

    from dynamicid_jax.weights.keymap import export_state_dict, write_safetensors

    if not isinstance(module, CLIPVisionModelWithProjection):
        raise TypeError(f"module must be a CLIPVisionModelWithProjection, got {type(module).__name__}")
    c = module.config
    dummy = jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), dummy)["params"]
    state = export_state_dict(jax.device_get(params), VISION_KEYMAP)
    load_state_dict(state, VISION_KEYMAP, abstract, source="save_image_encoder params")  # every key and shape
    config = {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
              **dataclasses.asdict(c)}
    from dynamicid_jax.file_io import atomic_folder

    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise FileExistsError(f"{folder} exists and is not a CLIP vision folder; not replacing it")
    with atomic_folder(folder, replace=True) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        write_safetensors({k: np.asarray(v, np.float32) for k, v in state.items()},
                          os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    return folder


# --------------------------------------------------------------------------------------------------------
# Image preprocessing (numpy / PIL; matches transformers' CLIPImageProcessor)
# --------------------------------------------------------------------------------------------------------
def _resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Shortest side → ``size``, the other scaled and truncated, as transformers computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _as_images(images) -> list:
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, np.ndarray) or hasattr(images, "__array__") and not isinstance(images, (list, tuple)):
        arr = np.asarray(images)
        if arr.ndim == 3:
            return [arr]
        if arr.ndim == 4:
            return list(arr)
        raise ValueError(f"images must be [H, W, 3] or [B, H, W, 3], got shape {arr.shape}")
    if isinstance(images, (list, tuple)) and images:
        return [im if isinstance(im, Image.Image) else np.asarray(im) for im in images]
    raise ValueError(f"images must be a PIL image, an array [H, W, 3] / [B, H, W, 3] or a non-empty list, "
                     f"got {type(images).__name__}")


def _preprocess_one(image, size: int) -> np.ndarray:
    from PIL import Image

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"each image must be RGB [H, W, 3] (NHWC), got shape {image.shape}")
    h, w = image.shape[:2]
    new_h, new_w = _resized_size(h, w, size)
    if np.issubdtype(image.dtype, np.floating):
        # [-1, 1] → 8-bit, as saving the image would: PIL's 8-bit bicubic rounds between its two passes, so only
        # 8-bit input reproduces the processor (a float resize differs by up to ~2 steps where pixels change fast)
        image = np.round((np.clip(np.asarray(image, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {image.dtype}")
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.float32)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top:top + size, left:left + size] / np.float32(255.0)
    return ((crop - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)).astype(np.float32)


def clip_preprocess(images: Any, size: int = 224) -> np.ndarray:
    """CLIP image preprocessing → NHWC ``float32 [B, size, size, 3]``.

    Resize the shortest side to ``size`` (bicubic), centre-crop ``size × size``, scale to ``[0, 1]`` and normalise
    with the OpenAI CLIP mean/std. ``images``: a PIL image, a ``uint8`` array in ``[0, 255]`` or a float array in
    ``[-1, 1]`` (the library's image convention), shaped ``[H, W, 3]`` or ``[B, H, W, 3]``, or a list of those
    (sizes may differ). Float input is rounded to 8 bits first; the result then equals transformers'
    ``CLIPImageProcessor`` (PIL backend) up to float32 rounding (measured in the tests).
    """
    return np.stack([_preprocess_one(im, size) for im in _as_images(images)])
