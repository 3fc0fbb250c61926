"""Stable Diffusion's conditional UNet (``UNet2DConditionModel``) in Flax linen, NHWC.

Module names mirror diffusers (``down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k``), so the weight map
(:data:`UNET_KEYMAP`) is a handful of rules. Every attention layer takes the UNet's ``strategy`` (see
:mod:`dynamicid_jax.models.attention`); per-call method inputs travel as ``attention_inputs``.

    unet, params = load_unet("path/to/sd15/unet")
    eps = unet.apply({"params": params}, latents_nhwc, timesteps, text_embeddings)
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynamicid_jax.models import layers
from dynamicid_jax.models.attention import Attention, AttentionStrategy, LayerInfo
from dynamicid_jax.weights import folders
from dynamicid_jax.weights import keymap as km

NUM_TIME_IDS = 6  # SDXL micro-conditioning: original (h, w), crop top-left (y, x), target (h, w)
ACT_AXES = ("activation_batch", "activation_height", "activation_width", "activation_embed")
SEQ_AXES = ("activation_batch", "activation_length", "activation_embed")

# Rematerialisation policies for ``UNet2DConditionModel(remat_policy=...)`` (training memory vs recompute):
# each ResNet block and each transformer block is wrapped in ``nn.remat`` with this ``jax.checkpoint`` policy.
REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul / conv outputs, recompute the elementwise ops
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def _remat(cls, policy: str | None):
    """``cls`` itself (no remat) or ``nn.remat(cls, policy=...)``; the param tree is the same either way."""
    if policy is None or policy == "none":
        return cls
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {policy!r}; expected None, 'none' or one of {sorted(REMAT_POLICIES)}")
    return nn.remat(cls, policy=REMAT_POLICIES[policy])


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The hyper-parameters of a diffusers ``UNet2DConditionModel`` that SD1.x / SD2.x checkpoints use."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # diffusers' historical naming: ``attention_head_dim`` holds the number of heads unless
    # ``num_attention_heads`` is given. We resolve both into ``heads_per_block``.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_out_scale_factor: float = 1.0
    # SDXL's added conditioning (``addition_embed_type="text_time"``): the pooled text embedding and the six
    # micro-conditioning ids (original size, crop top-left, target size), each id embedded sinusoidally with
    # ``addition_time_embed_dim`` channels, go through ``add_embedding`` and are added to the time embedding.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @property
    def text_time(self) -> bool:
        """True for SDXL-style UNets that take ``added_cond = {"text_embeds", "time_ids"}``."""
        return self.addition_embed_type == "text_time"

    @property
    def pooled_text_dim(self) -> int:
        """Width of ``added_cond["text_embeds"]`` (1280 for SDXL): the add-embedding input minus 6 time ids."""
        if not self.text_time:
            raise ValueError("this UNet has no added text/time conditioning (addition_embed_type is not 'text_time')")
        return self.projection_class_embeddings_input_dim - NUM_TIME_IDS * self.addition_time_embed_dim

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        if isinstance(heads, int):
            return (heads,) * len(self.down_block_types)
        return tuple(heads)

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        t = self.transformer_layers_per_block
        return (t,) * len(self.down_block_types) if isinstance(t, int) else tuple(t)

    def validate(self) -> "UNetConfig":
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNet config: {n} block_out_channels but {len(self.down_block_types)} down and "
                             f"{len(self.up_block_types)} up block types")
        for name in self.down_block_types:
            if name not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                raise ValueError(f"UNet config: unsupported down block type {name!r}")
        for name in self.up_block_types:
            if name not in ("CrossAttnUpBlock2D", "UpBlock2D"):
                raise ValueError(f"UNet config: unsupported up block type {name!r}")
        if self.mid_block_type not in ("UNetMidBlock2DCrossAttn",):
            raise ValueError(f"UNet config: unsupported mid block type {self.mid_block_type!r}")
        if len(self.heads_per_block) != n or len(self.transformer_layers) != n:
            raise ValueError("UNet config: attention heads / transformer layers must be one value or one per block")
        for c, h in zip(self.block_out_channels, self.heads_per_block):
            if c % h:
                raise ValueError(f"UNet config: {c} channels are not divisible by {h} heads")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNet config: addition_embed_type {self.addition_embed_type!r} is not supported "
                             f"(None or 'text_time' (SDXL))")
        if self.text_time:
            for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ValueError(f"UNet config: addition_embed_type='text_time' needs a positive integer "
                                     f"{name}, got {value!r}")
            if self.pooled_text_dim <= 0:
                raise ValueError(f"UNet config: projection_class_embeddings_input_dim "
                                 f"{self.projection_class_embeddings_input_dim} leaves no room for the pooled text "
                                 f"embedding after {NUM_TIME_IDS} × {self.addition_time_embed_dim} time-id channels")
        if self.act_fn != "silu":
            raise ValueError(f"UNet config: act_fn {self.act_fn!r} is not supported (SD uses 'silu')")
        return self

    @classmethod
    def from_dict(cls, config: dict[str, Any], *, source: str = "config") -> "UNetConfig":
        """Build from a diffusers ``unet/config.json`` dict. Options that change the architecture in ways SD1.x/2.x
        checkpoints never use must keep their default values; anything else unknown is an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, bad = {}, []
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key in _INERT_DEFAULTS:
                if value != _INERT_DEFAULTS[key] and not (value is None and _INERT_DEFAULTS[key] is None):
                    bad.append(f"{key}={value!r} (only {_INERT_DEFAULTS[key]!r} is supported)")
            else:
                bad.append(f"{key} (unknown option)")
        if bad:
            raise ValueError(f"{source}: unsupported UNet config entries: " + ", ".join(bad))
        return cls(**kwargs).validate()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {"_class_name": "UNet2DConditionModel",
                **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


# diffusers options whose non-default values change the architecture in ways we do not implement.
_INERT_DEFAULTS: dict[str, Any] = {
    "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "reverse_transformer_layers_per_block": None, "dropout": 0.0,
    "addition_embed_type_num_heads": 64,
}


def unet_config(variant: str = "sd15") -> UNetConfig:
    """Variant factory: ``"sd15"`` (859,520,964 params), ``"sdxl"`` (SDXL base 1.0), ``"tiny"`` / ``"tiny-sdxl"``
    (tests) or ``"synthface"`` (the SynthFace demo's base, trained from scratch by ``synthface/stage0.py``)."""
    if variant == "sd15":
        return UNetConfig().validate()
    if variant == "tiny":
        return UNetConfig(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2,
                          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                          norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2).validate()
    if variant == "synthface":
        # The SynthFace base (synthface/stage0.py): 16×16×4 latents (64 px), text width 64. Cross-attention at 8×8 and
        # 4×4 (and the mid block) only: attention over the 256 tokens of the 16×16 level costs more CPU time than
        # the rest of the UNet together.
        return UNetConfig(sample_size=16, block_out_channels=(64, 64, 64), layers_per_block=1,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          norm_num_groups=16, cross_attention_dim=64, attention_head_dim=4).validate()
    if variant == "sdxl":
        # stable-diffusion-xl-base-1.0's unet/config.json: 2,567,463,684 params.
        return UNetConfig(sample_size=128, block_out_channels=(320, 640, 1280),
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                          cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                          addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816).validate()
    if variant == "tiny-sdxl":
        # SDXL's structure at test size: the same block types, transformer depths (1, 2, 3) and added embeddings.
        return UNetConfig(sample_size=16, block_out_channels=(32, 64, 64), norm_num_groups=8,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 3),
                          cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                          addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8).validate()
    raise ValueError(f"unknown UNet variant {variant!r}; expected 'sd15', 'sdxl', 'tiny', 'tiny-sdxl' or "
                     f"'synthface'")


def attention_layer_names(config: UNetConfig) -> list[str]:
    """Attention layers in diffusers' ``unet.attn_processors`` order: registration order, i.e. down blocks, then
    up blocks, then the mid block (``mid_block`` is assigned after the two empty ModuleLists), attn1 before
    attn2."""
    names = []

    def block(prefix, n_attn, n_layers):
        for j in range(n_attn):
            for t in range(n_layers):
                base = f"{prefix}.attentions.{j}.transformer_blocks.{t}"
                names.extend([f"{base}.attn1", f"{base}.attn2"])

    for i, kind in enumerate(config.down_block_types):
        if kind == "CrossAttnDownBlock2D":
            block(f"down_blocks.{i}", config.layers_per_block, config.transformer_layers[i])
    rev_layers = list(reversed(config.transformer_layers))
    for i, kind in enumerate(config.up_block_types):
        if kind == "CrossAttnUpBlock2D":
            block(f"up_blocks.{i}", config.layers_per_block + 1, rev_layers[i])
    block("mid_block", 1, config.transformer_layers[-1])
    return names


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding as diffusers' ``get_timestep_embedding`` (fp32)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResnetBlock2D(nn.Module):
    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        h = layers.group_norm(self.groups, self.eps, name="norm1")(x).astype(self.dtype)
        h = layers.conv(self.out_channels, 3, padding=1, name="conv1", dtype=self.dtype)(jax.nn.silu(h))
        t = layers.dense(self.out_channels, name="time_emb_proj", dtype=self.dtype)(jax.nn.silu(temb))
        h = h + t[:, None, None, :]
        h = layers.group_norm(self.groups, self.eps, name="norm2")(h).astype(self.dtype)
        h = layers.conv(self.out_channels, 3, padding=1, name="conv2", dtype=self.dtype)(jax.nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = layers.conv(self.out_channels, 1, name="conv_shortcut", dtype=self.dtype)(x)
        out = (x + h) / self.output_scale_factor
        return nn.with_logical_constraint(out, ACT_AXES)


class GEGLU(nn.Module):
    inner: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        hidden, gate = jnp.split(layers.dense(self.inner * 2, name="proj", dtype=self.dtype)(x), 2, axis=-1)
        return hidden * layers.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward (``ff.net.0.proj`` → ``ff.net.2``)."""

    dim: int
    mult: int = 4
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return layers.dense(self.dim, name="net_2", dtype=self.dtype, axes=("mlp", "embed"))(h)


class BasicTransformerBlock(nn.Module):
    dim: int
    heads: int
    layer_name: str
    layer_index: int
    strategy: AttentionStrategy | None
    upcast: bool
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, inputs):
        def attn(kind, idx):
            info = LayerInfo(f"{self.layer_name}.attn{idx}", kind, self.layer_index + idx - 1)
            return Attention(heads=self.heads, head_dim=self.dim // self.heads, info=info, strategy=self.strategy,
                             upcast=self.upcast, dtype=self.dtype, name=f"attn{idx}")

        x = x + attn("self", 1)(layers.layer_norm(1e-5, name="norm1", dtype=self.dtype)(x), None, inputs)
        x = x + attn("cross", 2)(layers.layer_norm(1e-5, name="norm2", dtype=self.dtype)(x), context, inputs)
        x = x + FeedForward(self.dim, dtype=self.dtype, name="ff")(
            layers.layer_norm(1e-5, name="norm3", dtype=self.dtype)(x))
        return nn.with_logical_constraint(x, SEQ_AXES)


class Transformer2DModel(nn.Module):
    channels: int
    heads: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    layer_name: str
    first_index: int
    strategy: AttentionStrategy | None
    upcast: bool
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, inputs):
        b, hgt, wdt, c = x.shape
        h = layers.group_norm(self.groups, 1e-6, name="norm")(x).astype(self.dtype)
        if self.use_linear_projection:
            h = layers.dense(c, name="proj_in", dtype=self.dtype)(h.reshape(b, hgt * wdt, c))
        else:
            h = layers.conv(c, 1, name="proj_in", dtype=self.dtype)(h).reshape(b, hgt * wdt, c)
        for t in range(self.num_layers):
            h = BasicTransformerBlock(
                c, self.heads, f"{self.layer_name}.transformer_blocks.{t}", self.first_index + 2 * t,
                self.strategy, self.upcast, dtype=self.dtype, name=f"transformer_blocks_{t}")(h, context, inputs)
        if self.use_linear_projection:
            h = layers.dense(c, name="proj_out", dtype=self.dtype, axes=("mlp", "embed"))(h).reshape(b, hgt, wdt, c)
        else:
            h = layers.conv(c, 1, name="proj_out", dtype=self.dtype)(h.reshape(b, hgt, wdt, c))
        return h + x


class Downsample2D(nn.Module):
    channels: int
    padding: int = 1
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return layers.conv(self.channels, 3, strides=2, padding=self.padding, name="conv", dtype=self.dtype)(x)


class Upsample2D(nn.Module):
    channels: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
        return layers.conv(self.channels, 3, padding=1, name="conv", dtype=self.dtype)(x)


class UNetBlock(nn.Module):
    """One down / up block of diffusers (resnets, optional attentions, optional resampler) in one class.

    ``kind`` is ``"down"`` or ``"up"``; up blocks pop one skip tensor per resnet from ``skips``."""

    kind: str
    out_channels: int
    num_layers: int
    has_attention: bool
    heads: int
    transformer_layers: int
    resample: bool
    config: UNetConfig
    layer_name: str
    first_index: int
    strategy: AttentionStrategy | None
    dtype: layers.Dtype = jnp.float32
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, h, temb, context, inputs, skips):
        cfg, outputs = self.config, []
        resnet_cls, transformer_cls = _remat(ResnetBlock2D, self.remat_policy), _remat(Transformer2DModel,
                                                                                       self.remat_policy)
        for j in range(self.num_layers):
            if self.kind == "up":
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = resnet_cls(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.resnet_out_scale_factor,
                           dtype=self.dtype, name=f"resnets_{j}")(h, temb)
            if self.has_attention:
                h = transformer_cls(
                    self.out_channels, self.heads, self.transformer_layers, cfg.norm_num_groups,
                    cfg.use_linear_projection, f"{self.layer_name}.attentions.{j}",
                    self.first_index + 2 * self.transformer_layers * j, self.strategy, cfg.upcast_attention,
                    dtype=self.dtype, name=f"attentions_{j}")(h, context, inputs)
            outputs.append(h)
        if self.resample and self.kind == "down":
            h = Downsample2D(self.out_channels, cfg.downsample_padding, dtype=self.dtype, name="downsamplers_0")(h)
            outputs.append(h)
        if self.resample and self.kind == "up":
            h = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(h)
        return h, outputs


class MidBlock(nn.Module):
    channels: int
    heads: int
    transformer_layers: int
    config: UNetConfig
    first_index: int
    strategy: AttentionStrategy | None
    dtype: layers.Dtype = jnp.float32
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, h, temb, context, inputs):
        cfg = self.config
        resnet_cls = _remat(ResnetBlock2D, self.remat_policy)
        res = lambda j: resnet_cls(self.channels, cfg.norm_num_groups, cfg.norm_eps,  # noqa: E731
                                   cfg.mid_block_scale_factor, dtype=self.dtype, name=f"resnets_{j}")
        h = res(0)(h, temb)
        h = _remat(Transformer2DModel, self.remat_policy)(
            self.channels, self.heads, self.transformer_layers, cfg.norm_num_groups, cfg.use_linear_projection,
            "mid_block.attentions.0", self.first_index, self.strategy, cfg.upcast_attention, dtype=self.dtype,
            name="attentions_0")(h, context, inputs)
        return res(1)(h, temb)


class TimestepEmbedding(nn.Module):
    dim: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = layers.dense(self.dim, name="linear_1", dtype=self.dtype)(x)
        return layers.dense(self.dim, name="linear_2", dtype=self.dtype)(jax.nn.silu(x))


class UNet2DConditionModel(nn.Module):
    """ε- (or v-) prediction UNet: ``__call__(sample [B,h,w,4], timesteps [B] or scalar, encoder_hidden_states
    [B, L, cross_dim], attention_inputs=None) → [B,h,w,out_channels]``. ``h`` and ``w`` must be multiples of
    ``2 ** (len(block_out_channels) - 1)``. ``strategy`` is given to every attention layer."""

    config: UNetConfig
    strategy: AttentionStrategy | None = None
    dtype: layers.Dtype = jnp.float32
    remat_policy: str | None = None  # training only: a key of REMAT_POLICIES (per ResNet / transformer block)

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, attention_inputs: Any = None,
                 added_cond: Any = None):
        """``added_cond`` (SDXL, ``addition_embed_type="text_time"`` only): ``{"text_embeds": [B, P] pooled
        text, "time_ids": [B, 6] micro-conditioning}``, as diffusers' ``added_cond_kwargs``."""
        cfg = self.config
        n = len(cfg.block_out_channels)
        factor = 2 ** (n - 1)
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be NHWC [B, h, w, {cfg.in_channels}], got {sample.shape}")
        if sample.shape[1] % factor or sample.shape[2] % factor:
            raise ValueError(f"latent height/width must be multiples of {factor} (images: multiples of "
                             f"{8 * factor} px), got {tuple(sample.shape[1:3])}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != sample.shape[0]:
            raise ValueError(f"encoder_hidden_states must be [{sample.shape[0]}, L, {cfg.cross_attention_dim}], "
                             f"got {encoder_hidden_states.shape}")
        index = {name: i for i, name in enumerate(attention_layer_names(cfg))}
        t = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        ch0 = cfg.block_out_channels[0]
        temb = timestep_embedding(t, ch0, cfg.flip_sin_to_cos, cfg.freq_shift).astype(self.dtype)
        temb = TimestepEmbedding(4 * ch0, dtype=self.dtype, name="time_embedding")(temb)
        if cfg.text_time:
            temb = temb + self._text_time_embedding(added_cond, sample.shape[0], 4 * ch0)
        elif added_cond is not None:
            raise ValueError("added_cond is only for UNets with addition_embed_type='text_time' (SDXL)")
        context = encoder_hidden_states.astype(self.dtype)
        h = layers.conv(ch0, 3, padding=1, name="conv_in", dtype=self.dtype)(sample.astype(self.dtype))

        skips = [h]
        for i, kind in enumerate(cfg.down_block_types):
            attn = kind == "CrossAttnDownBlock2D"
            h, outs = UNetBlock(
                "down", cfg.block_out_channels[i], cfg.layers_per_block, attn, cfg.heads_per_block[i],
                cfg.transformer_layers[i], i < n - 1, cfg, f"down_blocks.{i}",
                index.get(f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn1", -1), self.strategy,
                dtype=self.dtype, remat_policy=self.remat_policy, name=f"down_blocks_{i}")(
                    h, temb, context, attention_inputs, None)
            skips.extend(outs)

        h = MidBlock(cfg.block_out_channels[-1], cfg.heads_per_block[-1], cfg.transformer_layers[-1], cfg,
                     index["mid_block.attentions.0.transformer_blocks.0.attn1"], self.strategy, dtype=self.dtype,
                     remat_policy=self.remat_policy, name="mid_block")(h, temb, context, attention_inputs)

        rev_ch, rev_heads, rev_layers = (tuple(reversed(x)) for x in
                                         (cfg.block_out_channels, cfg.heads_per_block, cfg.transformer_layers))
        for i, kind in enumerate(cfg.up_block_types):
            attn = kind == "CrossAttnUpBlock2D"
            h, _ = UNetBlock(
                "up", rev_ch[i], cfg.layers_per_block + 1, attn, rev_heads[i], rev_layers[i], i < n - 1, cfg,
                f"up_blocks.{i}", index.get(f"up_blocks.{i}.attentions.0.transformer_blocks.0.attn1", -1),
                self.strategy, dtype=self.dtype, remat_policy=self.remat_policy, name=f"up_blocks_{i}")(
                    h, temb, context, attention_inputs, skips)

        h = layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out")(h).astype(self.dtype)
        return layers.conv(cfg.out_channels, 3, padding=1, name="conv_out", dtype=self.dtype)(jax.nn.silu(h))


    def _text_time_embedding(self, added_cond, batch: int, dim: int):
        """SDXL's ``add_embedding(concat(text_embeds, sinusoid(time_ids)))``."""
        cfg = self.config
        if not isinstance(added_cond, dict) or not {"text_embeds", "time_ids"} <= set(added_cond):
            raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs added_cond={'text_embeds': "
                             f"[B, {cfg.pooled_text_dim}], 'time_ids': [B, {NUM_TIME_IDS}]}}")
        text, ids = jnp.asarray(added_cond["text_embeds"]), jnp.asarray(added_cond["time_ids"])
        if text.shape != (batch, cfg.pooled_text_dim) or ids.shape != (batch, NUM_TIME_IDS):
            raise ValueError(f"added_cond: text_embeds must be [{batch}, {cfg.pooled_text_dim}] and time_ids "
                             f"[{batch}, {NUM_TIME_IDS}], got {text.shape} and {ids.shape}")
        time_embeds = timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                         cfg.freq_shift).reshape(batch, -1)
        add = jnp.concatenate([text.astype(jnp.float32), time_embeds], axis=-1).astype(self.dtype)
        return TimestepEmbedding(dim, dtype=self.dtype, name="add_embedding")(add)


def dummy_added_cond(config: UNetConfig, batch: int = 1) -> dict | None:
    """Zero ``added_cond`` of the right shapes for ``init`` / ``eval_shape`` (``None`` for SD1.x/2.x UNets)."""
    if not config.text_time:
        return None
    return {"text_embeds": jnp.zeros((batch, config.pooled_text_dim), jnp.float32),
            "time_ids": jnp.zeros((batch, NUM_TIME_IDS), jnp.float32)}


def micro_conditioning(batch: int, latent_hw: tuple[int, int], vae_scale_factor: int = 8) -> jax.Array:
    """SDXL's ``time_ids [batch, 6]`` for an uncropped image generated at its own size: ``(H, W, 0, 0, H, W)``
    with ``H, W`` = latent size × the VAE's scale factor (what training and sampling at one size use)."""
    h, w = int(latent_hw[0]) * vae_scale_factor, int(latent_hw[1]) * vae_scale_factor
    return jnp.broadcast_to(jnp.asarray([h, w, 0, 0, h, w], jnp.float32), (batch, NUM_TIME_IDS))


UNET_KEYMAP = km.KeyMap(
    list_names=("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
                "upsamplers", "to_out", "net"),
)


def _init_args(config: UNetConfig, batch: int = 1):
    f = 2 ** (len(config.block_out_channels) - 1)
    args = (jnp.zeros((batch, f, f, config.in_channels), jnp.float32), jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, 1, config.cross_attention_dim), jnp.float32))
    return args + (None, dummy_added_cond(config, batch)) if config.text_time else args


def abstract_params(module: UNet2DConditionModel):
    """Shapes (and logical axes) of ``module``'s params without materialising them."""
    return jax.eval_shape(module.init, jax.random.key(0), *_init_args(module.config))["params"]


def init_params(module: UNet2DConditionModel, rng: jax.Array):
    """Random params (unboxed), e.g. for tests and SynthFace's stage 0."""
    return nn.meta.unbox(jax.jit(module.init)(rng, *_init_args(module.config))["params"])


def load_unet(path: str, *, dtype=jnp.float32, strategy: AttentionStrategy | None = None,
              variant: str | None = None) -> tuple[UNet2DConditionModel, dict]:
    """Load a diffusers ``unet/`` folder (``config.json`` + ``diffusion_pytorch_model[.variant].safetensors``).

    ``path`` may also be the pipeline folder that contains ``unet/``. Only local paths are accepted."""
    folder = folders.find_component(path, "unet")
    config = UNetConfig.from_dict(folders.read_config(folder), source=os.path.join(folder, "config.json"))
    state, source = folders.read_weights(folder, "diffusion_pytorch_model", variant=variant)
    return unet_from_state_dict(state, config, dtype=dtype, strategy=strategy, source=source)


def unet_from_state_dict(state, config: UNetConfig, *, dtype=jnp.float32, strategy: AttentionStrategy | None = None,
                         source: str = "state dict") -> tuple[UNet2DConditionModel, dict]:
    """Build the UNet for ``config`` and load a diffusers-named state dict (numpy arrays) into it."""
    module = UNet2DConditionModel(config, strategy=strategy, dtype=dtype)
    params = km.load_state_dict(state, UNET_KEYMAP, abstract_params(module), source=source)
    return module, jax.tree_util.tree_map(jnp.asarray, params)
