"""Attention with pluggable strategies — the one place where identity methods enter the UNet.

Every self- (``attn1``) and cross-attention (``attn2``) layer of the UNet is an :class:`Attention` module. It owns
the base projections (``to_q``, ``to_k``, ``to_v``, ``to_out_0`` — the names the SD1.5 weights load into) and hands
the computation to a **strategy**: a frozen (hashable) dataclass with the signature ::

    strategy(attn: Attention, proj: Projections, hidden: [B, Lq, C], context: [B, Lk, Cc] | None,
             inputs: Any) -> [B, Lq, C]

``hidden`` are the query-side tokens; ``context`` the key/value-side tokens of a cross-attention (``None`` for
self-attention); ``inputs`` is whatever pytree the caller passed as ``unet.apply(..., attention_inputs=...)``,
forwarded untouched to every layer (ID tokens' scale, boxes, the denoising step index …). ``attn.info`` says
which layer this is (:class:`LayerInfo`: diffusers name, ``"self"``/``"cross"``, index in diffusers'
``unet.attn_processors`` order), so one strategy can treat ``attn1`` and ``attn2`` differently.

A strategy runs *inside* the attention module's compact scope: modules it creates (``nn.Dense(...,
name="lora_q")``) become parameters of that layer, and ``attn.sow("intermediates", name, value)`` exposes
probes (gate maps, attention weights) to ``apply(..., mutable=["intermediates"])``. Helpers on the module —
:meth:`Attention.split_heads`, :meth:`Attention.merge_heads`, :meth:`Attention.attend` — keep strategies short and
send every kernel call through :func:`~dynamicid_jax.models.layers.dot_product_attention`.

:class:`StandardAttention` is the default (plain SD attention). DynamicID's SAA and Infinite-ID's mixed
attention are other strategies given to the same UNet (``UNet2DConditionModel(config, strategy=...)``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynamicid_jax.models import layers


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """Static facts about one attention layer."""

    name: str  # diffusers module path, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    kind: str  # "self" or "cross"
    index: int  # position in diffusers' ``unet.attn_processors`` (registration order)


@dataclasses.dataclass(frozen=True)
class Projections:
    """The layer's base projections (Flax modules), built by :class:`Attention` before the strategy runs."""

    q: nn.Module
    k: nn.Module
    v: nn.Module
    out: nn.Module


class AttentionStrategy(Protocol):
    def __call__(self, attn: "Attention", proj: Projections, hidden: jax.Array, context: jax.Array | None,
                 inputs: Any) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class StandardAttention:
    """Plain scaled dot-product attention: what Stable Diffusion itself computes."""

    def __call__(self, attn, proj, hidden, context, inputs):
        source = hidden if context is None else context
        q, k, v = proj.q(hidden), proj.k(source), proj.v(source)
        return proj.out(attn.merge_heads(attn.attend(attn.split_heads(q), attn.split_heads(k),
                                                     attn.split_heads(v))))


class Attention(nn.Module):
    """Multi-head attention whose computation is delegated to ``strategy``."""

    heads: int
    head_dim: int
    info: LayerInfo
    strategy: AttentionStrategy | None = None
    upcast: bool = False  # compute q·k and softmax in fp32 (diffusers' ``upcast_attention``)
    out_bias: bool = True
    qkv_bias: bool = False
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, context: jax.Array | None = None, inputs: Any = None) -> jax.Array:
        inner = self.heads * self.head_dim
        proj = Projections(
            q=layers.dense(inner, name="to_q", use_bias=self.qkv_bias, dtype=self.dtype),
            k=layers.dense(inner, name="to_k", use_bias=self.qkv_bias, dtype=self.dtype),
            v=layers.dense(inner, name="to_v", use_bias=self.qkv_bias, dtype=self.dtype),
            out=layers.dense(hidden.shape[-1], name="to_out_0", use_bias=self.out_bias, dtype=self.dtype,
                             axes=("mlp", "embed")),
        )
        strategy = self.strategy if self.strategy is not None else StandardAttention()
        return strategy(self, proj, hidden, context, inputs)

    # ---- helpers for strategies -------------------------------------------------------------------------
    def split_heads(self, x: jax.Array) -> jax.Array:
        """``[B, L, heads·d]`` → ``[B, L, heads, d]``."""
        return x.reshape(x.shape[:-1] + (self.heads, self.head_dim))

    def merge_heads(self, x: jax.Array) -> jax.Array:
        """``[B, L, heads, d]`` → ``[B, L, heads·d]``."""
        return x.reshape(x.shape[:-2] + (self.heads * self.head_dim,))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
        """Softmax attention on split heads, scale ``1/√head_dim``; fp32 when ``upcast``."""
        out_dtype = q.dtype
        if self.upcast:
            q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
        return layers.dot_product_attention(q, k, v, bias=bias, mask=mask).astype(out_dtype)

    def logits(self, q: jax.Array, k: jax.Array) -> jax.Array:
        """Scaled attention logits ``[B, heads, Lq, Lk]`` in fp32, for strategies that gate or route on them."""
        scale = self.head_dim ** -0.5
        return jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
