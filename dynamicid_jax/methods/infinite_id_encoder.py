"""Infinite-ID's identity encoder (docs/method.md §6.3): ``c_id = [M_clip(CLIP tokens); M_face(ArcFace vector)]``.

* face mapper — ``e [B, D]`` → Linear D→2D → GELU(erf) → Linear 2D→N_face·dim → reshape → LayerNorm;
* CLIP mapper — ``N_clip`` learned latent queries read the CLIP-H patch tokens through a perceiver resampler
  (``proj_in`` 1280→dim, ``depth`` × (PerceiverAttention + FeedForward), ``proj_out``, LayerNorm).

The token counts and why they were chosen are in :mod:`dynamicid_jax.methods.infinite_id`'s docstring, which
re-exports these names with the attention strategy that reads the tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax.methods.id_encoder import resample
from dynamicid_jax.models import layers

__all__ = ["InfiniteIDEncoderConfig", "infinite_id_encoder_config", "FaceMapper", "CLIPMapper", "InfiniteIDEncoder",
           "init_encoder_params", "abstract_encoder_params", "null_id_tokens", "stack_identities", "CLIP_INPUTS"]

LN_EPS = 1e-5
Dtype = Any
CLIP_INPUTS = ("aligned", "image")


@dataclasses.dataclass(frozen=True)
class InfiniteIDEncoderConfig:
    """Hyper-parameters of the Infinite-ID encoder. ``dim`` is the UNet's cross-attention width (768 for SD1.5).

    Two fields say how the CLIP features were made; training and inference both read them from here.
    ``clip_layer`` picks ``hidden_states[clip_layer]`` of the CLIP vision model (-2, the penultimate layer, as
    DynamicID and IP-Adapter-Plus use, so the features can be shared). ``clip_input`` is what CLIP sees:
    ``"aligned"`` is the ArcFace-aligned face crop (the paper's "Face Align" before both encoders);
    ``"image"`` is the whole reference image (DynamicID's convention, and what the stage-1 data loader
    provides)."""

    id_embed_dim: int = 512  # 512: ArcFace (insightface); 128: dlib
    dim: int = 768
    clip_dim: int = 1280  # CLIP-H/14 hidden size
    num_face_tokens: int = 4
    num_clip_tokens: int = 16
    depth: int = 4
    heads: int = 12
    head_dim: int = 64
    ff_mult: int = 4
    clip_layer: int = -2
    clip_input: str = "aligned"

    @property
    def num_tokens(self) -> int:
        """Tokens per identity: CLIP tokens first, then face tokens."""
        return self.num_clip_tokens + self.num_face_tokens

    def validate(self) -> "InfiniteIDEncoderConfig":
        for name in ("id_embed_dim", "dim", "clip_dim", "num_face_tokens", "num_clip_tokens", "depth", "heads",
                     "head_dim", "ff_mult"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"InfiniteIDEncoderConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.clip_layer, (int, np.integer)) or isinstance(self.clip_layer, bool):
            raise ValueError(f"InfiniteIDEncoderConfig.clip_layer must be an integer, got {self.clip_layer!r}")
        if self.clip_input not in CLIP_INPUTS:
            raise ValueError(f"InfiniteIDEncoderConfig.clip_input must be one of {CLIP_INPUTS}, got "
                             f"{self.clip_input!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InfiniteIDEncoderConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"InfiniteIDEncoderConfig: unknown entries {unknown}")
        return cls(**d).validate()


_VARIANTS = {
    "sd15": InfiniteIDEncoderConfig(),
    # sits on the tiny UNet (cross-attention 32) and the tiny CLIP vision tower (hidden 64)
    "tiny": InfiniteIDEncoderConfig(id_embed_dim=16, dim=32, clip_dim=64, num_face_tokens=2, num_clip_tokens=4,
                                    depth=1, heads=2, head_dim=16),
    # Infinite-ID's own backbone: tokens as wide as SDXL's 2048-wide context
    "sdxl": InfiniteIDEncoderConfig(dim=2048),
    # sits on the tiny SDXL UNet (cross-attention 64) and the tiny CLIP vision tower (hidden 64)
    "tiny-sdxl": InfiniteIDEncoderConfig(id_embed_dim=16, dim=64, clip_dim=64, num_face_tokens=2, num_clip_tokens=4,
                                         depth=1, heads=2, head_dim=16),
}


def infinite_id_encoder_config(variant: str = "sd15", **overrides: Any) -> InfiniteIDEncoderConfig:
    """``"sd15"``, ``"sdxl"``, ``"tiny"`` or ``"tiny-sdxl"`` with optional overrides, e.g. ``("sd15",
    id_embed_dim=128)`` for dlib."""
    if variant not in _VARIANTS:
        raise ValueError(f"unknown Infinite-ID encoder variant {variant!r}; expected one of {sorted(_VARIANTS)}")
    return dataclasses.replace(_VARIANTS[variant], **overrides).validate()


class FaceMapper(nn.Module):
    """ArcFace vector ``[B, D]`` → ``[B, num_face_tokens, dim]``."""

    config: InfiniteIDEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, id_embeds: jax.Array) -> jax.Array:
        cfg = self.config
        h = layers.dense(2 * cfg.id_embed_dim, name="proj_0", dtype=self.dtype)(id_embeds.astype(self.dtype))
        h = layers.dense(cfg.num_face_tokens * cfg.dim, name="proj_2", dtype=self.dtype)(layers.gelu(h))
        return layers.layer_norm(LN_EPS, name="norm", dtype=self.dtype)(
            h.reshape(h.shape[0], cfg.num_face_tokens, cfg.dim))


class CLIPMapper(nn.Module):
    """CLIP tokens ``[B, L, clip_dim]`` → ``[B, num_clip_tokens, dim]`` (learned queries + perceiver resampler)."""

    config: InfiniteIDEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, clip_features: jax.Array) -> jax.Array:
        cfg = self.config
        queries = self.param("latents", nn.with_logical_partitioning(nn.initializers.normal(cfg.dim ** -0.5),
                                                                     (None, "embed")),
                             (cfg.num_clip_tokens, cfg.dim), jnp.float32)
        latents = jnp.broadcast_to(queries.astype(self.dtype), (clip_features.shape[0],) + queries.shape)
        return resample(clip_features.astype(self.dtype), latents, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                        head_dim=cfg.head_dim, ff_mult=cfg.ff_mult, dtype=self.dtype)


class InfiniteIDEncoder(nn.Module):
    """``(id_embeds [B, D], clip_features [B, L, clip_dim]) → c_id [B, num_clip_tokens + num_face_tokens, dim]``
    (CLIP-mapper tokens first, as in the paper's ``Concat(M_clip, M_face)``)."""

    config: InfiniteIDEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, id_embeds: jax.Array, clip_features: jax.Array) -> jax.Array:
        cfg = self.config
        if id_embeds.ndim != 2 or id_embeds.shape[-1] != cfg.id_embed_dim:
            raise ValueError(f"InfiniteIDEncoder: id_embeds must be [B, {cfg.id_embed_dim}], got "
                             f"{tuple(id_embeds.shape)}")
        if clip_features.ndim != 3 or clip_features.shape[-1] != cfg.clip_dim:
            raise ValueError(f"InfiniteIDEncoder: clip_features must be [B, L, {cfg.clip_dim}] (CLIP hidden states "
                             f"[{cfg.clip_layer}]), got {tuple(clip_features.shape)}")
        if clip_features.shape[0] != id_embeds.shape[0]:
            raise ValueError(f"InfiniteIDEncoder: batch mismatch, id_embeds has {id_embeds.shape[0]} rows and "
                             f"clip_features {clip_features.shape[0]}")
        clip_tokens = CLIPMapper(cfg, self.dtype, name="clip_mapper")(clip_features)
        face_tokens = FaceMapper(cfg, self.dtype, name="face_mapper")(id_embeds)
        return jnp.concatenate([clip_tokens, face_tokens], axis=1)


def _encoder_args(config: InfiniteIDEncoderConfig):
    return jnp.zeros((1, config.id_embed_dim), jnp.float32), jnp.zeros((1, 2, config.clip_dim), jnp.float32)


def abstract_encoder_params(config: InfiniteIDEncoderConfig) -> dict:
    return jax.eval_shape(InfiniteIDEncoder(config).init, jax.random.key(0), *_encoder_args(config))["params"]


def init_encoder_params(config: InfiniteIDEncoderConfig, rng: jax.Array) -> dict:
    """Random encoder params (unboxed), for training from scratch and tests."""
    return nn.meta.unbox(jax.jit(InfiniteIDEncoder(config).init)(rng, *_encoder_args(config))["params"])


def null_id_tokens(encoder: InfiniteIDEncoder, params, null_clip_features: jax.Array) -> jax.Array:
    """The "no identity" tokens ``[1, T, dim]``: ``encoder(zeros(D), CLIP(zero normalised pixels))``. They are
    what training's ID dropout substitutes and what the ID stream's unconditional CFG row receives."""
    zeros = jnp.zeros((null_clip_features.shape[0], encoder.config.id_embed_dim), jnp.float32)
    return encoder.apply({"params": params}, zeros, null_clip_features)


def stack_identities(tokens: jax.Array) -> jax.Array:
    """``[n, T, dim]`` per-identity tokens → ``[1, n·T, dim]``: identity mixing by stacking the embeddings."""
    if tokens.ndim != 3:
        raise ValueError(f"stack_identities: expected [n, T, dim] tokens, got shape {tuple(tokens.shape)}")
    return tokens.reshape(1, tokens.shape[0] * tokens.shape[1], tokens.shape[2])
