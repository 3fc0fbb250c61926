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

from dynamicid_jax.models.layers import Dtype, activation, conv, dense, dot_product_attention, embed, layer_norm
from dynamicid_jax.weights import folders
from dynamicid_jax.weights.keymap import KeyMap, load_state_dict

SEQ_AXES = ("activation_batch", "activation_length", "activation_embed")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------
# PretrainedConfig bookkeeping and generation settings: present in real config.json files, no effect on a
# CLIP forward pass (dropout is inactive at inference; initialisers do not matter for loaded weights).
_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "attention_dropout", "dropout",
    "initializer_range", "initializer_factor", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "task_specific_params", "return_dict", "output_hidden_states",
    "output_attentions", "use_return_dict", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "gradient_checkpointing",
    "use_cache", "output_past", "xla_device", "is_composition", "logit_scale_init_value",
})
_TOP_LEVEL_KEYS = frozenset({"text_config", "vision_config", "text_config_dict", "vision_config_dict",
                             "projection_dim"})


def _check_keys(cls, d: Mapping[str, Any], source: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)} | _IGNORED_KEYS
    unknown = sorted(k for k in d if k not in known and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{source}: unknown config key(s) {unknown} for a {cls.__name__}; this implementation "
                         f"understands {sorted(f.name for f in dataclasses.fields(cls))} (plus transformers' "
                         f"bookkeeping keys) and cannot tell whether the unknown ones change the model")


def _square(value: Any, name: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{source}: {name}={value!r} is not square; only square sizes are supported")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of a CLIP text tower; field names are those of transformers' ``CLIPTextConfig``."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 768  # kept for completeness; CLIPTextModel has no projection

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        activation(self.hidden_act)  # raises for an unknown name

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "CLIPTextConfig":
        """From a ``CLIPTextConfig`` dict, or the ``text_config`` of a full ``CLIPModel`` config."""
        d = _sub_config(d, "text", source)
        _check_keys(cls, d, source)
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ValueError(f"{source}: eos_token_id={eos!r}; CLIP pooling needs a single EOS id")
            kwargs["eos_token_id"] = eos[0]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The transformers ``config.json`` form of a ``CLIPTextModel``."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **dataclasses.asdict(self)}

    def to_dict_with_projection(self) -> dict[str, Any]:
        """The ``config.json`` form of a ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``)."""
        return {**self.to_dict(), "architectures": ["CLIPTextModelWithProjection"]}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters of a CLIP vision tower + projection (transformers' ``CLIPVisionConfig``)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        activation(self.hidden_act)

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "CLIPVisionConfig":
        """From a ``CLIPVisionConfig`` dict, or the ``vision_config`` of a full ``CLIPModel`` config."""
        d = _sub_config(d, "vision", source)
        _check_keys(cls, d, source)
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        for name in ("image_size", "patch_size"):
            if name in kwargs:
                kwargs[name] = _square(kwargs[name], name, source)
        return cls(**kwargs)


_MODEL_TYPES = {"text": "clip_text_model", "vision": "clip_vision_model"}


def _sub_config(d: Mapping[str, Any], which: str, source: str) -> dict:
    """The ``which`` tower's flat config from either a tower config or a full ``CLIPModel`` config."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type == "clip" or any(k in d for k in _TOP_LEVEL_KEYS - {"projection_dim"}):
        unknown = sorted(k for k in d if k not in _TOP_LEVEL_KEYS | _IGNORED_KEYS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown} in a full CLIPModel config (expected "
                             f"{sorted(_TOP_LEVEL_KEYS)} and transformers' bookkeeping keys)")
        sub = dict(d.get(f"{which}_config") or {})
        sub.update(d.get(f"{which}_config_dict") or {})  # legacy *_config_dict wins, as in transformers
        if which == "vision" and d.get("projection_dim") is not None:
            sub["projection_dim"] = d["projection_dim"]  # CLIPModel's visual_projection uses the top-level one
        d, source = sub, f"{source} [{which}_config]"
        model_type = d.get("model_type")
    if model_type is not None and model_type != _MODEL_TYPES[which]:
        raise ValueError(f"{source}: model_type {model_type!r} is not a CLIP {which} config (expected "
                         f"{_MODEL_TYPES[which]!r} or a full 'clip' config)")
    return dict(d)


def text_config(variant: str = "sd15") -> CLIPTextConfig:
    """``"sd15"``: CLIP ViT-L/14 text (SD1.x, also SDXL's first encoder); ``"openclip-h"``: OpenCLIP ViT-H/14 text
    (SD2.x); ``"openclip-bigg"``: OpenCLIP ViT-bigG/14 text (SDXL's second encoder, with projection); ``"tiny"``;
    ``"synthface"``: the SynthFace base's (SD1.5 vocabulary and EOS, 77 positions, hidden size 64).

    ``"sd15"`` uses ``eos_token_id=49407``; SD1.5's own config.json says 2 (argmax pooling), which picks the same
    position for tokenizer output, since 49407 is the largest id.
    """
    variants = {
        "sd15": CLIPTextConfig(),
        "openclip-h": CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                     num_attention_heads=16, hidden_act="gelu", projection_dim=512),
        "openclip-bigg": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                        num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                        eos_token_id=2),  # as SDXL's text_encoder_2/config.json (argmax pooling)
        "tiny": CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, eos_token_id=999, projection_dim=64),
        # The SynthFace base (synthface/stage0.py): SD1.5's vocabulary / tokenizer, 77 positions, 64 wide.
        "synthface": CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                    projection_dim=64),
    }
    if variant not in variants:
        raise ValueError(f"unknown CLIP text variant {variant!r}; expected one of {sorted(variants)}")
    return variants[variant]


def vision_config(variant: str = "clip-h") -> CLIPVisionConfig:
    """``"clip-h"``: ViT-H/14 (laion2B), 224 px, 1280 wide, projection 1024; ``"clip-l"``: ViT-L/14; ``"tiny"``."""
    variants = {
        "clip-h": CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                   num_attention_heads=16, patch_size=14, hidden_act="gelu", projection_dim=1024),
        "clip-l": CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, patch_size=14, projection_dim=768),
        "tiny": CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                 image_size=32, patch_size=4, projection_dim=48),
    }
    if variant not in variants:
        raise ValueError(f"unknown CLIP vision variant {variant!r}; expected one of {sorted(variants)}")
    return variants[variant]


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
                         keep_projection: bool = False) -> dict[str, np.ndarray]:
    """Text-tower keys in the ``text_model.*`` layout of :data:`TEXT_KEYMAP`.

    transformers ≥ 5 saves a bare ``CLIPTextModel`` without the ``text_model.`` prefix; SD checkpoints written by
    older versions (and full CLIPModel files) have it. Keys of the vision tower / projections are dropped.
    """
    prefixed = any(k.startswith("text_model.") for k in state)
    out = {}
    for key, value in state.items():
        if _NOT_TEXT.match(key) and not (keep_projection and key.startswith("text_projection.")):
            continue
        if not prefixed and key.startswith(_TEXT_ROOTS):
            key = "text_model." + key
        out[key] = value
    return out


def canonical_vision_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Vision-tower + ``visual_projection`` keys; text-tower keys of a full CLIPModel file are dropped."""
    return {k: v for k, v in state.items() if not _NOT_VISION.match(k)}


def read_weights(folder: str | os.PathLike, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of ``model[.variant].safetensors`` or of the shards listed by ``model.safetensors.index.json``."""
    return folders.read_weights(folder, "model", variant=variant)[0]


def _to_device(tree, param_dtype: Dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=param_dtype), tree)


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
                             abstract, source=source)
    return model, _to_device(params, param_dtype)


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
    folder = folders.find_component(path, "text_encoder", what="text encoder")
    raw = folders.read_config(folder)
    config = CLIPTextConfig.from_dict(raw, source=os.path.join(folder, "config.json"))
    state, source = folders.read_weights(folder, "model", variant=variant)
    return text_encoder_from_state_dict(state, config, dtype=dtype, param_dtype=param_dtype, source=source,
                                        with_projection=is_projection_config(raw))


def load_image_encoder(path: str | os.PathLike, dtype: Dtype = jnp.float32, *, param_dtype: Dtype = jnp.float32,
                       variant: str | None = None) -> tuple[CLIPVisionModelWithProjection, dict]:
    """``(model, params)`` from a ``CLIPVisionModelWithProjection`` folder or a full ``CLIPModel`` folder."""
    folder = folders.find_component(path, "image_encoder", what="image encoder")
    config = CLIPVisionConfig.from_dict(folders.read_config(folder), source=os.path.join(folder, "config.json"))
    model = CLIPVisionModelWithProjection(config, dtype=dtype)
    dummy = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
    state = canonical_vision_state(read_weights(folder, variant))
    params = load_state_dict(state, VISION_KEYMAP, abstract, source=str(folder))
    return model, _to_device(params, param_dtype)


def save_image_encoder(folder: str | os.PathLike, module: CLIPVisionModelWithProjection, params: Any) -> str:
    """Write ``module``/``params`` as a transformers ``CLIPVisionModelWithProjection`` folder (``config.json`` +
    ``model.safetensors``, fp32) that :func:`load_image_encoder` and ``transformers`` both read. The folder
    appears complete or not at all (written to a temporary sibling, then renamed); an existing folder is replaced.
    Returns the folder."""
    import json
    import shutil
    import tempfile

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
    from dynamicid_jax.io_atomic import atomic_folder

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
