"""Small building blocks shared by every model family.

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

from typing import Any, Sequence

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
