"""Stable Diffusion's conditional UNet (``UNet2DConditionModel``) in Flax linen, NHWC.

Module names mirror diffusers (``down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k``), so the weight map
(:data:`UNET_KEYMAP`) is a handful of rules. Every attention layer takes the UNet's ``strategy`` (see
:class:`~dynamicid_jax.models.layers.Attention`); per-call method inputs travel as ``attention_inputs``.

    unet, params = load_unet("path/to/sd15/unet")
    eps = unet.apply({"params": params}, latents_nhwc, timesteps, text_embeddings)
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from dynamicid_jax.models import layers
from dynamicid_jax.models.configs import NUM_TIME_IDS, UNetConfig, unet_config
from dynamicid_jax.models.layers import Attention, AttentionStrategy, LayerInfo
from dynamicid_jax.weights import keymap as km

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


def split_params(params: Mapping, selected: Callable[[tuple[str, ...]], bool]) -> tuple[dict, dict]:
    """``params`` → ``(rest, chosen)``: the leaves whose path ``selected`` refuses and those it accepts, each a
    nested dict (a method's params are kept inside the UNet's tree, at its attention layers)."""
    flat = traverse_util.flatten_dict(dict(params))
    return (traverse_util.unflatten_dict({k: v for k, v in flat.items() if not selected(k)}),
            traverse_util.unflatten_dict({k: v for k, v in flat.items() if selected(k)}))


def merge_disjoint(base: Mapping, extra: Mapping, what: str) -> dict:
    """``base`` and ``extra`` joined into one nested dict; a leaf path in both is an error naming ``what``
    (``extra``'s kind, e.g. ``"SAA params"``) and the first clashing paths."""
    flat = traverse_util.flatten_dict(dict(base))
    more = traverse_util.flatten_dict(dict(extra))
    clash = sorted("/".join(k) for k in more if k in flat)
    if clash:
        raise ValueError(f"{what} overlap the base params at {clash[:5]}")
    flat.update(more)
    return traverse_util.unflatten_dict(flat)


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
    folder = km.find_component(path, "unet")
    config = UNetConfig.from_dict(km.read_config(folder), source=os.path.join(folder, "config.json"))
    state, source = km.read_weights(folder, "diffusion_pytorch_model", variant=variant)
    return unet_from_state_dict(state, config, dtype=dtype, strategy=strategy, source=source)


def unet_from_state_dict(state, config: UNetConfig, *, dtype=jnp.float32, strategy: AttentionStrategy | None = None,
                         source: str = "state dict") -> tuple[UNet2DConditionModel, dict]:
    """Build the UNet for ``config`` and load a diffusers-named state dict (numpy arrays) into it."""
    module = UNet2DConditionModel(config, strategy=strategy, dtype=dtype)
    params = km.load_state_dict(state, UNET_KEYMAP, abstract_params(module), source=source, place=jnp.asarray)
    return module, params
