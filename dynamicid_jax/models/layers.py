"""Small building blocks shared by every model family, the single attention kernel entry point
(:func:`dot_product_attention`) and the :class:`Attention` module with pluggable strategies (how identity methods
enter the UNet: see the section of that name below and docs/architecture.md §2).

Every parameter is created with logical axis names (``nn.with_logical_partitioning``) so that one rules table
(:mod:`dynamicid_jax.sharding`) maps it onto the mesh. Logical names used across the library:

========== =====================================================
``embed``  model width on the input side of a Dense layer
``mlp``    output side of a Dense layer (hidden / heads·dim)
``heads``  attention output projections' input side
``conv_in`` / ``conv_out``  channel dims of a convolution kernel (HWIO)
``conv_h`` / ``conv_w``      spatial dims of a convolution kernel
``norm``   scale / bias vectors of normalisation layers
``vocab``  rows of an embedding table
========== =====================================================

Numerics follow the PyTorch modules we load weights from: exact-erf GELU where torch uses ``nn.GELU()``,
explicit epsilons everywhere (Flax's defaults differ from torch's).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Activations of the UNet / VAE / CLIP are sharded along these logical names (batch first).
ACT_BATCH = "activation_batch"


def _kernel_init(axes: Sequence[str | None]):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), tuple(axes))


def _zeros(axes: Sequence[str | None]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes))


def _ones(axes: Sequence[str | None]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), tuple(axes))


def dense(features: int, *, name: str, use_bias: bool = True, dtype: Dtype = jnp.float32,
          axes: tuple[str | None, str | None] = ("embed", "mlp"),
          kernel_init=None) -> nn.Dense:
    """A Dense layer whose kernel ``[in, out]`` and bias ``[out]`` carry logical axis names."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init or _kernel_init(axes),
        bias_init=_zeros((axes[1],)),
        name=name,
    )


def conv(features: int, kernel_size: int, *, name: str, strides: int = 1, padding: int | str = 0,
         dtype: Dtype = jnp.float32, use_bias: bool = True) -> nn.Conv:
    """An NHWC convolution (kernel HWIO) with PyTorch-style symmetric integer padding."""
    pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=pad,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_kernel_init(("conv_h", "conv_w", "conv_in", "conv_out")),
        bias_init=_zeros(("conv_out",)),
        name=name,
    )


def group_norm(num_groups: int, epsilon: float, *, name: str, dtype: Dtype = jnp.float32) -> nn.GroupNorm:
    """GroupNorm over the channel (last) axis; statistics are computed in fp32."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        dtype=jnp.float32,  # fp32 statistics; outputs are cast by the caller
        param_dtype=jnp.float32,
        scale_init=_ones(("norm",)),
        bias_init=_zeros(("norm",)),
        name=name,
    )


def layer_norm(epsilon: float, *, name: str, dtype: Dtype = jnp.float32,
               use_scale: bool = True, use_bias: bool = True) -> nn.LayerNorm:
    """LayerNorm over the last axis with an explicit epsilon (torch's default is 1e-5, Flax's 1e-6)."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_scale=use_scale,
        use_bias=use_bias,
        scale_init=_ones(("norm",)),
        bias_init=_zeros(("norm",)),
        name=name,
    )


def embed(num_embeddings: int, features: int, *, name: str, dtype: Dtype = jnp.float32) -> nn.Embed:
    return nn.Embed(
        num_embeddings,
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        name=name,
    )


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as ``torch.nn.GELU()``."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


# --------------------------------------------------------------------------------------------------------
# The single attention kernel entry point.
# --------------------------------------------------------------------------------------------------------
def _default_implementation(q: jax.Array) -> str:
    # cuDNN flash attention needs fp16/bf16 inputs and a GPU backend; XLA everywhere else.
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128:
        return "cudnn"
    return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
                          mask: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """``softmax(q kᵀ · scale + bias) v`` for ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` → ``[B, Lq, H, D]``.

    Every attention in the library goes through here (``jax.nn.dot_product_attention``); ``mask`` is boolean,
    broadcastable to ``[B, H, Lq, Lk]`` with True = attend.
    """
    impl = _default_implementation(q)
    if bias is not None or mask is not None:
        impl = "xla"  # arbitrary masks / biases are an XLA-path feature
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=impl)


# --------------------------------------------------------------------------------------------------------
# Attention with pluggable strategies — the one place where identity methods enter the UNet.
# --------------------------------------------------------------------------------------------------------
#
# Every self- (``attn1``) and cross-attention (``attn2``) layer of the UNet is an :class:`Attention` module. It owns
# the base projections (``to_q``, ``to_k``, ``to_v``, ``to_out_0`` — the names the SD1.5 weights load into) and hands
# the computation to a **strategy**: a frozen (hashable) dataclass with the signature ::
#
#     strategy(attn: Attention, proj: Projections, hidden: [B, Lq, C], context: [B, Lk, Cc] | None,
#              inputs: Any) -> [B, Lq, C]
#
# ``hidden`` are the query-side tokens; ``context`` the key/value-side tokens of a cross-attention (``None`` for
# self-attention); ``inputs`` is whatever pytree the caller passed as ``unet.apply(..., attention_inputs=...)``,
# forwarded untouched to every layer (ID tokens' scale, boxes, the denoising step index …). ``attn.info`` says
# which layer this is (:class:`LayerInfo`: diffusers name, ``"self"``/``"cross"``, index in diffusers'
# ``unet.attn_processors`` order), so one strategy can treat ``attn1`` and ``attn2`` differently.
#
# A strategy runs *inside* the attention module's compact scope: modules it creates (``nn.Dense(...,
# name="lora_q")``) become parameters of that layer, and ``attn.sow("intermediates", name, value)`` exposes
# probes (gate maps, attention weights) to ``apply(..., mutable=["intermediates"])``. Helpers on the module —
# :meth:`Attention.split_heads`, :meth:`Attention.merge_heads`, :meth:`Attention.attend` — keep strategies short and
# send every kernel call through :func:`dot_product_attention`.
#
# :class:`StandardAttention` is the default (plain SD attention). DynamicID's SAA and Infinite-ID's mixed
# attention are other strategies given to the same UNet (``UNet2DConditionModel(config, strategy=...)``).


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
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, context: jax.Array | None = None, inputs: Any = None) -> jax.Array:
        inner = self.heads * self.head_dim
        proj = Projections(
            q=dense(inner, name="to_q", use_bias=self.qkv_bias, dtype=self.dtype),
            k=dense(inner, name="to_k", use_bias=self.qkv_bias, dtype=self.dtype),
            v=dense(inner, name="to_v", use_bias=self.qkv_bias, dtype=self.dtype),
            out=dense(hidden.shape[-1], name="to_out_0", use_bias=self.out_bias, dtype=self.dtype,
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
        return dot_product_attention(q, k, v, bias=bias, mask=mask).astype(out_dtype)

    def logits(self, q: jax.Array, k: jax.Array) -> jax.Array:
        """Scaled attention logits ``[B, heads, Lq, Lk]`` in fp32, for strategies that gate or route on them."""
        scale = self.head_dim ** -0.5
        return jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
