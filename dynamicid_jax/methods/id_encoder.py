"""DynamicID's ID encoder ("face encoder"): ArcFace vector + CLIP-H tokens → 4 ID tokens (docs/method.md §3).

Architecture (the IP-Adapter-FaceID-Plus projection that DynamicID calls ``ProjPlusModel``)::

    e [B, D] ─ Linear D→2D ─ GELU(erf) ─ Linear 2D→N·C ─ reshape [B, N, C] ─ LayerNorm ─→ x  (MLP tokens)
    clip [B, L, Cclip] ─ proj_in ─→ c
    latents = x;  per layer:  latents += PerceiverAttention(c, latents);  latents += FeedForward(latents)
    out = LayerNorm(proj_out(latents));   shortcut=True → x + scale · out

``PerceiverAttention(context, latents)``: queries from ``LN₂(latents)``, keys/values from the concatenation
``[LN₁(context); LN₂(latents)]`` along the token axis (one packed ``to_kv`` Linear, K first, then V), no biases.
``FeedForward``: LN → Linear(×mult, no bias) → GELU(erf) → Linear (no bias). Attention scale 1/√head_dim (the
official ``(q·d^-¼)(k·d^-¼)ᵀ`` is the same number). LayerNorm ε = 1e-5 everywhere.

Weights: Flax names mirror the official state dict of ``ProjPlusModel`` (the ``proj_module`` entry of the
official ``SAA.bin``); :data:`ID_ENCODER_KEYMAP` holds the few renames. Key groups, all defined in the official
``functions.py`` (``ProjPlusModel``, ``FacePerceiverResampler``, ``PerceiverAttention``, ``FeedForward``)::

    proj.0.{weight,bias}  proj.2.{weight,bias}  norm.{weight,bias}                       ← ProjPlusModel
    perceiver_resampler.proj_in / proj_out / norm_out .{weight,bias}                      ← FacePerceiverResampler
    perceiver_resampler.layers.{i}.0.{norm1,norm2}.{weight,bias}, .0.{to_q,to_kv,to_out}.weight
                                                                                          ← PerceiverAttention
    perceiver_resampler.layers.{i}.1.0.{weight,bias}, .1.1.weight, .1.3.weight             ← FeedForward

The CLIP vision model is a separate module; this file takes its penultimate hidden states as input.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynamicid_jax.models import layers
from dynamicid_jax.weights import keymap as km

Dtype = Any
LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class IDEncoderConfig:
    """Hyper-parameters of the ID encoder. ``dim`` is the UNet's cross-attention width (768 for SD1.5)."""

    id_embed_dim: int = 512  # 512: ArcFace (insightface); 128: dlib
    num_tokens: int = 4
    dim: int = 768
    clip_dim: int = 1280  # CLIP-H/14 hidden size
    depth: int = 4
    head_dim: int = 64
    heads: int = 12  # the official code uses dim // 64
    ff_mult: int = 4

    def validate(self) -> "IDEncoderConfig":
        for name in ("id_embed_dim", "num_tokens", "dim", "clip_dim", "depth", "head_dim", "heads", "ff_mult"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"IDEncoderConfig.{name} must be positive, got {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IDEncoderConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"IDEncoderConfig: unknown entries {unknown}")
        return cls(**d).validate()


_VARIANTS = {
    "sd15": IDEncoderConfig(),
    # small enough for CPU tests; dims chosen to sit on a tiny UNet (cross-attention 32) and a tiny CLIP (48)
    "tiny": IDEncoderConfig(id_embed_dim=16, num_tokens=4, dim=32, clip_dim=48, depth=2, head_dim=16, heads=2,
                            ff_mult=4),
    # SDXL: ID tokens as wide as SDXL's 2048-wide context (its two text encoders' states concatenated); heads
    # follow the official dim // 64 rule
    "sdxl": IDEncoderConfig(dim=2048, heads=32),
    # on the tiny SDXL UNet (cross-attention 64) and the tiny CLIP vision tower (hidden 64)
    "tiny-sdxl": IDEncoderConfig(id_embed_dim=16, num_tokens=4, dim=64, clip_dim=64, depth=2, head_dim=16, heads=4,
                                 ff_mult=4),
}


def id_encoder_config(variant: str = "sd15", **overrides: Any) -> IDEncoderConfig:
    """A named configuration (``"sd15"``, ``"sdxl"``, ``"tiny"``, ``"tiny-sdxl"``) with optional field overrides,
    e.g. ``id_encoder_config("sd15", id_embed_dim=128)`` for dlib embeddings."""
    if variant not in _VARIANTS:
        raise ValueError(f"unknown ID encoder variant {variant!r}; expected one of {sorted(_VARIANTS)}")
    return dataclasses.replace(_VARIANTS[variant], **overrides).validate()


# ---------------------------------------------------------------------------------------------------------
# Building blocks (shared with the IMR in methods/imr.py)
# ---------------------------------------------------------------------------------------------------------
def _split_heads(x: jax.Array, heads: int, head_dim: int) -> jax.Array:
    b, n, _ = x.shape
    return x.reshape(b, n, heads, head_dim)


def _merge_heads(x: jax.Array) -> jax.Array:
    b, n, h, d = x.shape
    return x.reshape(b, n, h * d)


class FeedForward(nn.Module):
    """LN → Linear(dim → mult·dim, no bias) → GELU(erf) → Linear(mult·dim → dim, no bias).

    Official ``FeedForward`` (an ``nn.Sequential``): index 0 = ``norm``, 1 = ``linear_in``, 3 = ``linear_out``."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = layers.layer_norm(LN_EPS, name="norm", dtype=self.dtype)(x)
        h = layers.dense(int(dim * self.mult), name="linear_in", use_bias=False, dtype=self.dtype)(h)
        h = layers.gelu(h)
        return layers.dense(dim, name="linear_out", use_bias=False, dtype=self.dtype, axes=("mlp", "embed"))(h)


class PerceiverAttention(nn.Module):
    """``latents`` attend to ``[LN₁(context); LN₂(latents)]`` (multi-head, no biases).

    ``context [B, Lc, C]``, ``latents [B, Ll, C]`` → ``[B, Ll, C]`` (add the residual outside)."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, context: jax.Array, latents: jax.Array) -> jax.Array:
        dim = latents.shape[-1]
        if context.shape[-1] != dim:
            raise ValueError(f"PerceiverAttention: context width {context.shape[-1]} != latent width {dim}")
        inner = self.heads * self.head_dim
        context = layers.layer_norm(LN_EPS, name="norm1", dtype=self.dtype)(context)
        latents = layers.layer_norm(LN_EPS, name="norm2", dtype=self.dtype)(latents)
        q = layers.dense(inner, name="to_q", use_bias=False, dtype=self.dtype)(latents)
        kv = layers.dense(2 * inner, name="to_kv", use_bias=False, dtype=self.dtype)(
            jnp.concatenate([context, latents], axis=1))
        k, v = jnp.split(kv, 2, axis=-1)  # packed [K | V]
        out = layers.dot_product_attention(_split_heads(q, self.heads, self.head_dim),
                                           _split_heads(k, self.heads, self.head_dim),
                                           _split_heads(v, self.heads, self.head_dim))
        return layers.dense(dim, name="to_out", use_bias=False, dtype=self.dtype,
                            axes=("mlp", "embed"))(_merge_heads(out))


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``LN(x)`` with a packed ``to_kv`` (no biases); the official ``MultAttention``."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        inner = self.heads * self.head_dim
        x = layers.layer_norm(LN_EPS, name="norm1", dtype=self.dtype)(x)
        q = layers.dense(inner, name="to_q", use_bias=False, dtype=self.dtype)(x)
        k, v = jnp.split(layers.dense(2 * inner, name="to_kv", use_bias=False, dtype=self.dtype)(x), 2, axis=-1)
        out = layers.dot_product_attention(_split_heads(q, self.heads, self.head_dim),
                                           _split_heads(k, self.heads, self.head_dim),
                                           _split_heads(v, self.heads, self.head_dim))
        return layers.dense(dim, name="to_out", use_bias=False, dtype=self.dtype,
                            axes=("mlp", "embed"))(_merge_heads(out))


# ---------------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------------
def resample(clip_features: jax.Array, latents: jax.Array, *, dim: int, depth: int, heads: int, head_dim: int,
             ff_mult: int, dtype: Dtype) -> jax.Array:
    """The perceiver body both methods' encoders share: ``proj_in`` on the CLIP tokens, ``depth`` × (attention of
    the latents on [tokens; latents] + FF, each residual), ``proj_out``, LayerNorm. Called inside a module's
    ``nn.compact`` method, its submodules (``proj_in``, ``attn_i``, ``ff_i``, ``proj_out``, ``norm_out``) belong
    to that module, so the param tree is the calling module's."""
    x = layers.dense(dim, name="proj_in", dtype=dtype)(clip_features)
    for i in range(depth):
        latents = PerceiverAttention(heads, head_dim, dtype=dtype, name=f"attn_{i}")(x, latents) + latents
        latents = FeedForward(ff_mult, dtype=dtype, name=f"ff_{i}")(latents) + latents
    latents = layers.dense(dim, name="proj_out", dtype=dtype, axes=("mlp", "embed"))(latents)
    return layers.layer_norm(LN_EPS, name="norm_out", dtype=dtype)(latents)


class PerceiverResampler(nn.Module):
    """``FacePerceiverResampler``: latents ← CLIP tokens, ``depth`` × (attention + FF), then proj_out + LN."""

    config: IDEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array, clip_features: jax.Array) -> jax.Array:
        cfg = self.config
        return resample(clip_features, latents, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                        head_dim=cfg.head_dim, ff_mult=cfg.ff_mult, dtype=self.dtype)


class IDEncoder(nn.Module):
    """``(id_embeds [B, D], clip_features [B, L, Cclip]) → ID tokens [B, num_tokens, dim]``.

    ``clip_features`` are CLIP-H's penultimate hidden states (``hidden_states[-2]``, ``[B, 257, 1280]`` for
    ViT-H/14 at 224 px). ``shortcut=False`` (inference default) returns the resampler output;
    ``shortcut=True`` returns ``x + scale · resampler`` with ``x`` the MLP tokens. Intermediates sown:
    ``mlp_tokens``.
    """

    config: IDEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, id_embeds: jax.Array, clip_features: jax.Array, shortcut: bool = False,
                 scale: float = 1.0) -> jax.Array:
        cfg = self.config
        if id_embeds.ndim != 2 or id_embeds.shape[-1] != cfg.id_embed_dim:
            raise ValueError(f"IDEncoder: id_embeds must be [B, {cfg.id_embed_dim}], got {tuple(id_embeds.shape)}")
        if clip_features.ndim != 3 or clip_features.shape[-1] != cfg.clip_dim:
            raise ValueError(f"IDEncoder: clip_features must be [B, L, {cfg.clip_dim}] (CLIP penultimate hidden "
                             f"states), got {tuple(clip_features.shape)}")
        if clip_features.shape[0] != id_embeds.shape[0]:
            raise ValueError(f"IDEncoder: batch mismatch, id_embeds has {id_embeds.shape[0]} rows and "
                             f"clip_features {clip_features.shape[0]}")
        h = layers.dense(2 * cfg.id_embed_dim, name="proj_0", dtype=self.dtype)(id_embeds.astype(self.dtype))
        h = layers.gelu(h)
        h = layers.dense(cfg.num_tokens * cfg.dim, name="proj_2", dtype=self.dtype)(h)
        x = layers.layer_norm(LN_EPS, name="norm", dtype=self.dtype)(
            h.reshape(h.shape[0], cfg.num_tokens, cfg.dim))
        self.sow("intermediates", "mlp_tokens", x)
        out = PerceiverResampler(cfg, dtype=self.dtype, name="perceiver_resampler")(
            x, clip_features.astype(self.dtype))
        if shortcut:
            out = x + scale * out
        return out


# Flax path → official ``ProjPlusModel`` state-dict key (functions.py); see the module docstring.
ID_ENCODER_KEYMAP = km.KeyMap(
    list_names=("proj",),
    renames=(
        (r"^perceiver_resampler\.attn_(\d+)\.", r"perceiver_resampler.layers.\1.0."),
        (r"^perceiver_resampler\.ff_(\d+)\.norm\.", r"perceiver_resampler.layers.\1.1.0."),
        (r"^perceiver_resampler\.ff_(\d+)\.linear_in\.", r"perceiver_resampler.layers.\1.1.1."),
        (r"^perceiver_resampler\.ff_(\d+)\.linear_out\.", r"perceiver_resampler.layers.\1.1.3."),
    ),
)


def _init_args(config: IDEncoderConfig, batch: int = 1, clip_len: int = 2):
    return (jnp.zeros((batch, config.id_embed_dim), jnp.float32),
            jnp.zeros((batch, clip_len, config.clip_dim), jnp.float32))


def abstract_params(module: IDEncoder):
    """Shapes (and logical axes) of ``module``'s params without materialising them."""
    return jax.eval_shape(module.init, jax.random.key(0), *_init_args(module.config))["params"]


def init_params(module: IDEncoder, rng: jax.Array):
    """Random params (unboxed), e.g. for tests and training from scratch."""
    return nn.meta.unbox(jax.jit(module.init)(rng, *_init_args(module.config))["params"])


def unconditional_clip_pixels(batch: int = 1, image_size: int = 224) -> jax.Array:
    """The CLIP input of the unconditional branch: an all-zero *normalised* pixel tensor ``[B, H, W, 3]`` (NHWC),
    i.e. the dataset-mean grey image. Feed it to the CLIP vision model and take ``hidden_states[-2]``."""
    return jnp.zeros((batch, image_size, image_size, 3), jnp.float32)


def unconditional_id_tokens(module: IDEncoder, params, clip_features_of_grey: jax.Array, *,
                            shortcut: bool = False, scale: float = 1.0) -> jax.Array:
    """The ID tokens of classifier-free guidance's negative branch: ``encoder(zeros(D), CLIP(zeros))``.

    ``clip_features_of_grey`` = CLIP's penultimate hidden states of :func:`unconditional_clip_pixels`
    (``[B, L, Cclip]``); the result is ``[B, num_tokens, dim]``. Repeat it once per identity; it never passes
    through the IMR (docs/method.md §3)."""
    if clip_features_of_grey.ndim != 3:
        raise ValueError("unconditional_id_tokens: clip_features_of_grey must be [B, L, Cclip], got "
                         f"{tuple(clip_features_of_grey.shape)}")
    zeros = jnp.zeros((clip_features_of_grey.shape[0], module.config.id_embed_dim), jnp.float32)
    return module.apply({"params": params}, zeros, clip_features_of_grey, shortcut=shortcut, scale=scale)
