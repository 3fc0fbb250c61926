"""Stable Diffusion's KL autoencoder (diffusers ``AutoencoderKL``) in Flax linen, NHWC.

Module names mirror diffusers (``encoder/down_blocks_0/resnets_1/conv1``, ``encoder/mid_block/attentions_0/to_q``,
``decoder/up_blocks_0/upsamplers_0/conv`` …), so the weight map (:data:`VAE_KEYMAP`) is a list of module-list names
and no renames. ::

    vae, params = load_vae("path/to/sd15/vae")
    posterior = vae.apply({"params": params}, images, method="encode")     # images [B, H, W, 3] in [-1, 1]
    images = vae.apply({"params": params}, latents, method="decode")        # latents NOT scaled (see below)

Scaling: ``encode``/``decode`` work in the VAE's own latent space. The diffusion model sees latents multiplied
by ``scaling_factor`` (and shifted by ``shift_factor`` where a config has one). :func:`encode_to_latents` and
:func:`decode_latents` apply that scaling; a caller of ``method="decode"`` must divide by it first.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dynamicid_jax.models import layers
from dynamicid_jax.models.configs import VAEConfig, vae_config, vae_scale_factor  # noqa: F401 (re-exported)
from dynamicid_jax.weights import keymap as km

ACT_AXES = ("activation_batch", "activation_height", "activation_width", "activation_embed")
_EPS = 1e-6  # every GroupNorm of diffusers' Encoder / Decoder


# --------------------------------------------------------------------------------------------------------
# The latent distribution
# --------------------------------------------------------------------------------------------------------
@struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior ``N(mean, exp(logvar))`` over NHWC latents (a pytree; fp32)."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Split ``[..., 2·C]`` moments (mean first, as diffusers' channel chunk) and clip ``logvar`` to
        ``[-30, 20]``."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def moments(self) -> jax.Array:
        """``concat([mean, logvar], -1)``: what to store when precomputing latents."""
        return jnp.concatenate([self.mean, self.logvar], axis=-1)

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL to the standard normal, summed over H, W, C → ``[B]``."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------
class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` without a time embedding (the VAE's)."""

    out_channels: int
    groups: int
    act_fn: str = "silu"
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = layers.activation(self.act_fn)
        h = layers.group_norm(self.groups, _EPS, name="norm1")(x).astype(self.dtype)
        h = layers.conv(self.out_channels, 3, padding=1, name="conv1", dtype=self.dtype)(act(h))
        h = layers.group_norm(self.groups, _EPS, name="norm2")(h).astype(self.dtype)
        h = layers.conv(self.out_channels, 3, padding=1, name="conv2", dtype=self.dtype)(act(h))
        if x.shape[-1] != self.out_channels:
            x = layers.conv(self.out_channels, 1, name="conv_shortcut", dtype=self.dtype)(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: GroupNorm, one head as wide as the channels, residual."""

    groups: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = layers.group_norm(self.groups, _EPS, name="group_norm")(x).astype(self.dtype)
        y = y.reshape(b, h * w, c)
        q, k, v = (layers.dense(c, name=n, dtype=self.dtype)(y).reshape(b, h * w, 1, c)
                   for n in ("to_q", "to_k", "to_v"))
        o = layers.dot_product_attention(q, k, v, scale=1.0 / float(np.sqrt(c))).reshape(b, h * w, c)
        o = layers.dense(c, name="to_out_0", dtype=self.dtype, axes=("mlp", "embed"))(o)
        return x + o.reshape(b, h, w, c)


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv after padding one row/column at the bottom/right (diffusers' ``padding=0`` case)."""

    channels: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return layers.conv(self.channels, 3, strides=2, padding=0, name="conv", dtype=self.dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    channels: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return layers.conv(self.channels, 3, padding=1, name="conv", dtype=self.dtype)(x)


class DownEncoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    act_fn: str = "silu"
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.act_fn, self.dtype, name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    act_fn: str = "silu"
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.act_fn, self.dtype, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet → (attention) → resnet at the lowest resolution."""

    channels: int
    groups: int
    add_attention: bool = True
    act_fn: str = "silu"
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock2D(self.channels, self.groups, self.act_fn, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = SpatialSelfAttention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.groups, self.act_fn, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
    config: VAEConfig
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = layers.conv(cfg.block_out_channels[0], 3, padding=1, name="conv_in", dtype=self.dtype)(x)
        for i, ch in enumerate(cfg.block_out_channels):
            x = DownEncoderBlock2D(ch, cfg.layers_per_block, cfg.norm_num_groups, i < cfg.num_levels - 1,
                                   cfg.act_fn, self.dtype, name=f"down_blocks_{i}")(x)
            x = nn.with_logical_constraint(x, ACT_AXES)
        x = UNetMidBlock2D(cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention,
                           cfg.act_fn, self.dtype, name="mid_block")(x)
        x = layers.group_norm(cfg.norm_num_groups, _EPS, name="conv_norm_out")(x).astype(self.dtype)
        x = layers.activation(cfg.act_fn)(x)
        return layers.conv(2 * cfg.latent_channels, 3, padding=1, name="conv_out", dtype=self.dtype)(x)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        x = layers.conv(cfg.block_out_channels[-1], 3, padding=1, name="conv_in", dtype=self.dtype)(z)
        x = UNetMidBlock2D(cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention,
                           cfg.act_fn, self.dtype, name="mid_block")(x)
        for i, ch in enumerate(reversed(cfg.block_out_channels)):
            x = UpDecoderBlock2D(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, i < cfg.num_levels - 1,
                                 cfg.act_fn, self.dtype, name=f"up_blocks_{i}")(x)
            x = nn.with_logical_constraint(x, ACT_AXES)
        x = layers.group_norm(cfg.norm_num_groups, _EPS, name="conv_norm_out")(x).astype(self.dtype)
        x = layers.activation(cfg.act_fn)(x)
        return layers.conv(cfg.out_channels, 3, padding=1, name="conv_out", dtype=self.dtype)(x)


def _check_nhwc(x: jax.Array, channels: int, what: str, expected: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} must be NHWC [B, H, W, {channels}] ({expected}), got shape {tuple(x.shape)}")
    if x.shape[-1] != channels:
        hint = " (it looks NCHW: move channels last)" if x.shape[1] == channels else ""
        raise ValueError(f"{what} must have {channels} channels last ({expected}), got shape "
                         f"{tuple(x.shape)}{hint}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{what} must be floating point ({expected}), got dtype {x.dtype}")


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL``. ``dtype`` is the compute dtype (params stay fp32; GroupNorm statistics and
    the posterior are fp32).

    * ``apply(v, images, method="encode")`` → :class:`DiagonalGaussian` over ``[B, H/f, W/f, latent_channels]``;
      images are NHWC floats in ``[-1, 1]``.
    * ``apply(v, latents, method="decode")`` → images ``[B, H, W, out_channels]`` (fp32, not clipped). The
      latents are in the VAE's own space: divide the diffusion model's latents by ``scaling_factor`` first (or
      use :func:`decode_latents`).
    * ``apply(v, images)`` (also used by ``init``) → reconstruction of the posterior mode, or of a sample when
      ``rng`` is given.
    """

    config: VAEConfig
    dtype: layers.Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        c2 = 2 * cfg.latent_channels
        self.quant_conv = (layers.conv(c2, 1, name="quant_conv", dtype=self.dtype) if cfg.use_quant_conv
                           else None)
        self.post_quant_conv = (layers.conv(cfg.latent_channels, 1, name="post_quant_conv", dtype=self.dtype)
                                if cfg.use_post_quant_conv else None)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        _check_nhwc(images, self.config.in_channels, "images", "values in [-1, 1]")
        h = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        self.sow("intermediates", "moments", h)
        return DiagonalGaussian.from_moments(h)

    def decode(self, latents: jax.Array) -> jax.Array:
        _check_nhwc(latents, self.config.latent_channels, "latents",
                    "unscaled: diffusion latents divided by scaling_factor")
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        posterior = self.encode(images)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return self.decode(z)


# --------------------------------------------------------------------------------------------------------
# Scaled-latent helpers (what the diffusion model sees)
# --------------------------------------------------------------------------------------------------------
def _as_float_images(images: jax.Array) -> jax.Array:
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images


@functools.partial(jax.jit, static_argnums=0)
def encode_to_latents(vae: AutoencoderKL, params: Any, images: jax.Array, rng: jax.Array | None) -> jax.Array:
    """``(posterior.sample(rng) − shift_factor) · scaling_factor`` — the diffusion model's latents.

    ``images`` are NHWC floats in ``[-1, 1]`` (``uint8`` in ``[0, 255]`` is converted). ``rng=None`` uses the
    posterior mean instead of a sample. Jitted, with ``vae`` static."""
    cfg = vae.config
    posterior = vae.apply({"params": params}, _as_float_images(images), method="encode")
    z = posterior.mode() if rng is None else posterior.sample(rng)
    if cfg.shift_factor is not None:
        z = z - cfg.shift_factor
    return z * cfg.scaling_factor


@functools.partial(jax.jit, static_argnums=0)
def decode_latents(vae: AutoencoderKL, params: Any, latents: jax.Array) -> jax.Array:
    """Images in ``[-1, 1]`` (clipped, NHWC fp32) from the diffusion model's (scaled) latents. Jitted, with
    ``vae`` static."""
    cfg = vae.config
    z = jnp.asarray(latents) / cfg.scaling_factor
    if cfg.shift_factor is not None:
        z = z + cfg.shift_factor
    return jnp.clip(vae.apply({"params": params}, z, method="decode"), -1.0, 1.0)


# --------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------
VAE_KEYMAP = km.KeyMap(
    list_names=("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out"),
)

# diffusers < 0.14 named the mid-block attention projections query/key/value/proj_attn.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")


def rename_legacy_attention_keys(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """Rename old diffusers VAE attention keys (``query``/``key``/``value``/``proj_attn``) to the current ones
    (a view: values are read from ``state`` when accessed)."""

    def rename(key: str) -> str:
        m = _LEGACY_RE.match(key)
        return f"{m.group(1)}{_LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}" if m else key

    return km.RenamedStateDict(state, rename)


def abstract_params(vae: AutoencoderKL) -> Any:
    """The param tree's shapes (``jax.eval_shape``; nothing is allocated)."""
    f = vae.config.downsample_factor
    images = jax.ShapeDtypeStruct((1, 2 * f, 2 * f, vae.config.in_channels), jnp.float32)
    return jax.eval_shape(vae.init, jax.random.key(0), images)["params"]


def init_params(vae: AutoencoderKL, rng: jax.Array) -> Any:
    """Random params (Flax initialisers) — for tests and training from scratch."""
    f = vae.config.downsample_factor
    images = jnp.zeros((1, 2 * f, 2 * f, vae.config.in_channels), jnp.float32)
    return nn.meta.unbox(jax.jit(vae.init)(rng, images)["params"])


def vae_from_state_dict(state: Mapping[str, Any], config: VAEConfig | Mapping[str, Any], *,
                        dtype=jnp.float32, source: str = "state dict") -> tuple[AutoencoderKL, Any]:
    """Build the model from ``config`` and load a diffusers-named torch state dict (numpy arrays) into it."""
    if not isinstance(config, VAEConfig):
        config = VAEConfig.from_dict(config, source=f"{source} config")
    vae = AutoencoderKL(config, dtype=dtype)
    params = km.load_state_dict(rename_legacy_attention_keys(state), VAE_KEYMAP, abstract_params(vae),
                                source=source, place=jnp.asarray)
    return vae, params


def export_vae_state_dict(params: Any) -> dict[str, np.ndarray]:
    """diffusers-named, torch-layout state dict (the inverse of loading)."""
    return km.export_state_dict(params, VAE_KEYMAP)


def load_vae(path: str, dtype=jnp.float32, *, variant: str | None = None) -> tuple[AutoencoderKL, Any]:
    """Load a local diffusers ``vae/`` folder: ``config.json`` + ``diffusion_pytorch_model[.variant].safetensors``.

    ``path`` may also be the pipeline folder that contains ``vae/``. ``dtype`` is the compute dtype; params are
    fp32. Missing folder / file, bad JSON, unsupported config entries and mismatching weights raise errors that
    name the path."""
    from dynamicid_jax.weights.keymap import find_component, read_config, read_weights

    folder = find_component(path, "vae")
    config = VAEConfig.from_dict(read_config(folder), source=f"{folder}/config.json")
    state, source = read_weights(folder, "diffusion_pytorch_model", variant=variant)
    return vae_from_state_dict(state, config, dtype=dtype, source=source)
