"""DynamicID's Identity-Motion Reconfigurator (docs/method.md §5): KeyPointEncoder, motion fusion,
Disentangle/EntangleNet.

Data flow for one identity (one source image, ``T`` targets)::

    raster [1+T, 96, 96, 1] ─ KeyPointEncoder ─→ landmark_feat [1+T, 768]          (≥ 0: it ends in ReLU)
    ψ = MotionFusion(concat(landmark_feat, text_feat))  → [1+T, 4, 1024];  ψ_src = ψ[:1], ψ_tgt = ψ[1:]
    x = proj_in(norm_in(id_tokens))                     [1, 4, 768] → [1, 4, 1024]
    x = DisentangleNet(x, ψ_src)                         (batch 1)
    x = broadcast x to T rows
    x = EntangleNet(x, ψ_tgt)                            [T, 4, 1024]
    edited = proj_out(norm_out(x))                       [T, 4, 768]

Every detail below was checked against the official ``model.py`` (class ``IMR``, ``KeyPointEncoder``,
``Conv2d``, ``PerceiverAttention``, ``MultAttention``, ``FeedForward``):

* The token-path LayerNorm + Linear (``norm_in``/``proj_in``) and the output ``norm_out``/``proj_out`` belong to
  the IMR itself, *not* to the Disentangle/EntangleNet blocks; the nets are the bare block stacks.
* Block: ``x = PerceiverAttention(ψ, x) + x; x = SelfAttention(x) + x; x = FeedForward(x) + x``. In the
  perceiver attention, ``norm1`` normalises ψ (the context), ``norm2`` the tokens; keys/values are
  ``[norm1(ψ); norm2(x)]`` in that order (ψ first), queries ``to_q(norm2(x))``. Residuals add the *un-normalised*
  ``x``. The self-attention has its own ``norm1`` (only one LN). FF = LN → Linear ×4 (no bias) → GELU → Linear.
  16 heads × 64, no biases in attention.
* Motion fusion is applied row-wise to ``concat([src; tgt])`` (``[1+T, 1536]``): LN(1536) → Linear 1536→1024 →
  GELU → LN(1024) → Linear 1024→4096 → GELU → reshape ``[1+T, 4, 1024]``. The concatenation order inside a row
  is ``[landmark_feat, text_feat]``.
* The official attention helper (``model.reshape_tensor``) reshapes to 3-D and then permutes as 4-D, which
  raises at runtime; the released checkpoint must come from standard 4-D multi-head attention, which is what
  we implement (docs/method.md §5.4).
* KeyPointEncoder: 7 stages (``blocks.0`` … ``blocks.6``) of Conv→BN(→ +x)→ReLU units; a 96×96 input is
  reduced to 3×3 by five stride-2 convs, then the 3×3 *valid* conv makes it 1×1 and the 1×1 conv sets 768
  channels. There is **no pooling**: the official callers reshape the ``[B, 768, 1, 1]`` map to ``[B, 768]``
  (``pipeline.get_edited_token``, ``train_IMR.py``); we do the same, which is only defined for 96×96 input.

BatchNorm follows ``torch.nn.BatchNorm2d`` exactly (ε 1e-5, momentum 0.1 in torch = 0.9 here): train mode
normalises with the biased batch variance and updates the running variance with the *unbiased* one (Flax's
``nn.BatchNorm`` uses the biased one, hence the small module below). Running statistics live in the
``batch_stats`` collection.

Official state-dict key groups (``model.py``):
  ``IMR.bin``: ``feature_fusion.{0,3}.{weight,bias}`` (LN), ``feature_fusion.{1,4}.{weight,bias}`` (Linear),
  ``norm_in``/``proj_in``/``norm_out``/``proj_out``.{weight,bias},
  ``{disentangleNet,entangleNet}.{i}.0.{norm1,norm2}.*`` + ``.0.{to_q,to_kv,to_out}.weight`` (PerceiverAttention),
  ``.{i}.1.norm1.*`` + ``.1.{to_q,to_kv,to_out}.weight`` (MultAttention), ``.{i}.2.0.*``, ``.2.1.weight``,
  ``.2.3.weight`` (FeedForward).
  ``key_point_encoder.bin``: ``blocks.{i}.{j}.conv_block.0.{weight,bias}`` (Conv2d),
  ``blocks.{i}.{j}.conv_block.1.{weight,bias,running_mean,running_var,num_batches_tracked}`` (BatchNorm2d).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynamicid_jax.methods.id_encoder import LN_EPS, FeedForward, PerceiverAttention, SelfAttention
from dynamicid_jax.models import layers
from dynamicid_jax.weights import keymap as km

Dtype = Any
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # Flax convention: new = momentum · old + (1 − momentum) · batch  (torch momentum 0.1)
RASTER_SIZE = 96


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class IMRConfig:
    """Hyper-parameters of the IMR. ``embedding_dim`` is both the ID-token width and the landmark-feature width
    (the official class ties them); ``txt_dim`` is the pooled text-encoder width."""

    dim: int = 1024
    head_dim: int = 64
    heads: int = 16
    num_queries: int = 4  # motion tokens; must equal the number of ID tokens
    embedding_dim: int = 768
    txt_dim: int = 768
    ff_mult: int = 4
    disentangle_depth: int = 1  # official class default 4; the released setup (IMR_depth) uses 1
    entangle_depth: int = 1

    def validate(self) -> "IMRConfig":
        for f in dataclasses.fields(self):
            if int(getattr(self, f.name)) <= 0:
                raise ValueError(f"IMRConfig.{f.name} must be positive, got {getattr(self, f.name)!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IMRConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"IMRConfig: unknown entries {unknown}")
        return cls(**d).validate()


@dataclasses.dataclass(frozen=True)
class KeyPointEncoderConfig:
    """The KeyPointEncoder is fixed-size apart from its output width (the official ``embedding_dim``)."""

    embedding_dim: int = 768

    def validate(self) -> "KeyPointEncoderConfig":
        if self.embedding_dim <= 0:
            raise ValueError(f"KeyPointEncoderConfig.embedding_dim must be positive, got {self.embedding_dim}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KeyPointEncoderConfig":
        unknown = sorted(set(d) - {"embedding_dim"})
        if unknown:
            raise ValueError(f"KeyPointEncoderConfig: unknown entries {unknown}")
        return cls(**d).validate()


_IMR_VARIANTS = {
    "sd15": IMRConfig(),
    "tiny": IMRConfig(dim=64, head_dim=16, heads=4, num_queries=4, embedding_dim=32, txt_dim=32, ff_mult=4,
                      disentangle_depth=1, entangle_depth=1),
    # SDXL: ID tokens / landmark features as wide as the 2048-wide context; the text feature is SDXL's pooled
    # prompt embedding (the second text encoder's 1280-wide projection)
    "sdxl": IMRConfig(embedding_dim=2048, txt_dim=1280),
    "tiny-sdxl": IMRConfig(dim=64, head_dim=16, heads=4, num_queries=4, embedding_dim=64, txt_dim=32, ff_mult=4,
                           disentangle_depth=1, entangle_depth=1),
}
_KPE_VARIANTS = {"sd15": KeyPointEncoderConfig(), "tiny": KeyPointEncoderConfig(embedding_dim=32),
                 "sdxl": KeyPointEncoderConfig(embedding_dim=2048),
                 "tiny-sdxl": KeyPointEncoderConfig(embedding_dim=64)}


def imr_config(variant: str = "sd15", **overrides: Any) -> IMRConfig:
    """``"sd15"`` (the released setup: depth 1 + 1), ``"sdxl"``, ``"tiny"`` or ``"tiny-sdxl"``, with optional field
    overrides."""
    if variant not in _IMR_VARIANTS:
        raise ValueError(f"unknown IMR variant {variant!r}; expected one of {sorted(_IMR_VARIANTS)}")
    return dataclasses.replace(_IMR_VARIANTS[variant], **overrides).validate()


def keypoint_encoder_config(variant: str = "sd15", **overrides: Any) -> KeyPointEncoderConfig:
    if variant not in _KPE_VARIANTS:
        raise ValueError(f"unknown KeyPointEncoder variant {variant!r}; expected one of {sorted(_KPE_VARIANTS)}")
    return dataclasses.replace(_KPE_VARIANTS[variant], **overrides).validate()


# ---------------------------------------------------------------------------------------------------------
# KeyPointEncoder
# ---------------------------------------------------------------------------------------------------------
class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` semantics over NHWC (statistics over N, H, W in fp32).

    ``train=True``: normalise with the batch mean / biased variance and, unless initialising, update
    ``batch_stats`` ``mean``/``var`` with momentum, using the unbiased variance for ``var`` as torch does."""

    epsilon: float = BN_EPS
    momentum: float = BN_MOMENTUM
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (c,),
                           jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (c,),
                          jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if train:
            n = x.size // c
            if n < 2:
                raise ValueError(f"BatchNorm in train mode needs more than one value per channel, got input shape "
                                 f"{tuple(x.shape)} (use a batch of at least 2 rasters, or train=False)")
            mean = jnp.mean(xf, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var * (n / (n - 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)


class ConvBlock(nn.Module):
    """Official ``Conv2d``: Conv(bias) → BatchNorm (→ + input when ``residual``) → ReLU."""

    features: int
    kernel_size: int
    stride: int
    padding: int
    residual: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        h = layers.conv(self.features, self.kernel_size, strides=self.stride, padding=self.padding,
                        name="conv", dtype=self.dtype)(x)
        h = BatchNorm(dtype=self.dtype, name="bn")(h, train)
        if self.residual:
            h = h + x
        return jax.nn.relu(h)


# (out_channels, kernel, stride, padding, residual) per unit, grouped like the official ``blocks`` ModuleList.
def _keypoint_stages(embedding_dim: int) -> tuple[tuple[tuple[int, int, int, int, bool], ...], ...]:
    def stage(cin_out, n_res):
        return ((cin_out, 3, 2, 1, False),) + ((cin_out, 3, 1, 1, True),) * n_res

    return (
        ((16, 7, 1, 3, False),),
        stage(32, 2), stage(64, 3), stage(128, 2), stage(256, 2), stage(512, 1),
        ((512, 3, 1, 0, False), (embedding_dim, 1, 1, 0, False)),
    )


class KeyPointEncoder(nn.Module):
    """Landmark raster ``[B, 96, 96, 1]`` (values in [-1, 1]) → landmark feature ``[B, embedding_dim]``.

    ``train=True`` uses batch statistics and updates ``batch_stats`` (call ``apply(...,
    mutable=["batch_stats"])``); ``train=False`` uses the running statistics."""

    config: KeyPointEncoderConfig = KeyPointEncoderConfig()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, raster: jax.Array, train: bool = False) -> jax.Array:
        if raster.ndim != 4 or tuple(raster.shape[1:]) != (RASTER_SIZE, RASTER_SIZE, 1):
            raise ValueError(f"KeyPointEncoder: raster must be [B, {RASTER_SIZE}, {RASTER_SIZE}, 1] (a single-channel "
                             f"96×96 landmark image, NHWC), got {tuple(raster.shape)}")
        h = raster.astype(self.dtype)
        for i, stage in enumerate(_keypoint_stages(self.config.embedding_dim)):
            for j, (features, k, s, p, residual) in enumerate(stage):
                h = ConvBlock(features, k, s, p, residual, dtype=self.dtype, name=f"blocks_{i}_{j}")(h, train)
        return h.reshape(h.shape[0], -1)  # [B, 1, 1, C] → [B, C], as the official callers reshape


# Flax path → ``key_point_encoder.bin`` key (model.py: KeyPointEncoder.blocks / Conv2d.conv_block).
KEYPOINT_ENCODER_KEYMAP = km.KeyMap(
    renames=(
        (r"^blocks_(\d+)_(\d+)\.conv\.", r"blocks.\1.\2.conv_block.0."),
        (r"^blocks_(\d+)_(\d+)\.bn\.", r"blocks.\1.\2.conv_block.1."),
    ),
    ignore=(r"\.num_batches_tracked$",),
)


# ---------------------------------------------------------------------------------------------------------
# IMR
# ---------------------------------------------------------------------------------------------------------
class MotionFusion(nn.Module):
    """``concat(landmark_feat, text_feat)`` → LN → Linear → GELU → LN → Linear → GELU → ``[N, queries, dim]``.

    Official ``feature_fusion`` (``nn.Sequential``): 0 = ``norm_0``, 1 = ``linear_1``, 3 = ``norm_3``,
    4 = ``linear_4``."""

    dim: int
    num_queries: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, landmark_feat: jax.Array, text_feat: jax.Array) -> jax.Array:
        h = jnp.concatenate([landmark_feat, text_feat], axis=-1).astype(self.dtype)
        h = layers.layer_norm(LN_EPS, name="norm_0", dtype=self.dtype)(h)
        h = layers.gelu(layers.dense(self.dim, name="linear_1", dtype=self.dtype)(h))
        h = layers.layer_norm(LN_EPS, name="norm_3", dtype=self.dtype)(h)
        h = layers.gelu(layers.dense(self.num_queries * self.dim, name="linear_4", dtype=self.dtype)(h))
        return h.reshape(h.shape[0], self.num_queries, self.dim)


class _ReconfigNet(nn.Module):
    """``depth`` blocks of ``x = PerceiverAttn(ψ, x) + x; x = SelfAttn(x) + x; x = FF(x) + x``."""

    depth: int
    heads: int
    head_dim: int
    ff_mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, motion: jax.Array) -> jax.Array:
        for i in range(self.depth):
            x = PerceiverAttention(self.heads, self.head_dim, dtype=self.dtype, name=f"perceiver_attn_{i}")(
                motion, x) + x
            x = SelfAttention(self.heads, self.head_dim, dtype=self.dtype, name=f"self_attn_{i}")(x) + x
            x = FeedForward(self.ff_mult, dtype=self.dtype, name=f"ff_{i}")(x) + x
        return x


class DisentangleNet(_ReconfigNet):
    """Removes the source motion ψ_src from the source tokens (official ``IMR.disentangleNet``)."""


class EntangleNet(_ReconfigNet):
    """Injects each target motion ψ_tgt into the disentangled tokens (official ``IMR.entangleNet``)."""


class IMR(nn.Module):
    """``(id_tokens [1, N, E], src_landmark_feat [1, E], src_text_feat [1, Dt], tgt_landmark_feat [T, E],
    tgt_text_feat [T, Dt]) → edited tokens [T, N, E]`` — one source broadcast over ``T`` targets.

    Source features may also be given as 1-D vectors. (The official ``IMR.forward`` takes the same tensors in the
    order ``x, src_landmark, tgt_landmark, src_txt, tgt_txt``.) Intermediates sown: ``motion_src``, ``motion_tgt``,
    ``disentangled``."""

    config: IMRConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, id_tokens: jax.Array, src_landmark_feat: jax.Array, src_text_feat: jax.Array,
                 tgt_landmark_feat: jax.Array, tgt_text_feat: jax.Array) -> jax.Array:
        cfg = self.config
        e, dt = cfg.embedding_dim, cfg.txt_dim
        if id_tokens.ndim != 3 or id_tokens.shape[0] != 1 or tuple(id_tokens.shape[1:]) != (cfg.num_queries, e):
            raise ValueError(f"IMR: id_tokens must be [1, {cfg.num_queries}, {e}] (one source identity), got "
                             f"{tuple(id_tokens.shape)}")
        src_landmark_feat = _as_row(src_landmark_feat, e, "src_landmark_feat")
        src_text_feat = _as_row(src_text_feat, dt, "src_text_feat")
        for name, arr, width in (("tgt_landmark_feat", tgt_landmark_feat, e), ("tgt_text_feat", tgt_text_feat, dt)):
            if arr.ndim != 2 or arr.shape[1] != width:
                raise ValueError(f"IMR: {name} must be [T, {width}], got {tuple(arr.shape)}")
        if tgt_landmark_feat.shape[0] != tgt_text_feat.shape[0]:
            raise ValueError(f"IMR: {tgt_landmark_feat.shape[0]} target landmark rows but "
                             f"{tgt_text_feat.shape[0]} target text rows")
        t = tgt_landmark_feat.shape[0]

        motion = MotionFusion(cfg.dim, cfg.num_queries, dtype=self.dtype, name="feature_fusion")(
            jnp.concatenate([src_landmark_feat, tgt_landmark_feat], axis=0),
            jnp.concatenate([src_text_feat, tgt_text_feat], axis=0))
        motion_src, motion_tgt = motion[:1], motion[1:]
        self.sow("intermediates", "motion_src", motion_src)
        self.sow("intermediates", "motion_tgt", motion_tgt)

        x = layers.layer_norm(LN_EPS, name="norm_in", dtype=self.dtype)(id_tokens.astype(self.dtype))
        x = layers.dense(cfg.dim, name="proj_in", dtype=self.dtype)(x)
        x = DisentangleNet(cfg.disentangle_depth, cfg.heads, cfg.head_dim, cfg.ff_mult, dtype=self.dtype,
                           name="disentangleNet")(x, motion_src)
        self.sow("intermediates", "disentangled", x)
        x = jnp.broadcast_to(x, (t,) + x.shape[1:])
        x = EntangleNet(cfg.entangle_depth, cfg.heads, cfg.head_dim, cfg.ff_mult, dtype=self.dtype,
                        name="entangleNet")(x, motion_tgt)
        x = layers.layer_norm(LN_EPS, name="norm_out", dtype=self.dtype)(x)
        return layers.dense(e, name="proj_out", dtype=self.dtype, axes=("mlp", "embed"))(x)


def _as_row(x: jax.Array, width: int, name: str) -> jax.Array:
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape != (1, width):
        raise ValueError(f"IMR: {name} must be [1, {width}] or [{width}] (one source), got {tuple(x.shape)}")
    return x


_BLOCK_PARTS = (("perceiver_attn", "0"), ("self_attn", "1"), ("ff", "2"))
# Flax path → ``IMR.bin`` key (model.py: IMR, PerceiverAttention, MultAttention, FeedForward).
IMR_KEYMAP = km.KeyMap(
    renames=(
        (r"^feature_fusion\.(?:norm|linear)_(\d)\.", r"feature_fusion.\1."),
        (r"\.ff_(\d+)\.norm\.", r".ff_\1.0."),
        (r"\.ff_(\d+)\.linear_in\.", r".ff_\1.1."),
        (r"\.ff_(\d+)\.linear_out\.", r".ff_\1.3."),
    ) + tuple((rf"^(disentangleNet|entangleNet)\.{flax}_(\d+)\.", rf"\1.\2.{idx}.") for flax, idx in _BLOCK_PARTS),
)


def _imr_init_args(config: IMRConfig, targets: int = 2):
    e, dt = config.embedding_dim, config.txt_dim
    return (jnp.zeros((1, config.num_queries, e), jnp.float32), jnp.zeros((1, e), jnp.float32),
            jnp.zeros((1, dt), jnp.float32), jnp.zeros((targets, e), jnp.float32),
            jnp.zeros((targets, dt), jnp.float32))


def abstract_params(module: IMR):
    """Shapes (and logical axes) of the IMR's params without materialising them."""
    return jax.eval_shape(module.init, jax.random.key(0), *_imr_init_args(module.config))["params"]


def init_params(module: IMR, rng: jax.Array):
    return nn.meta.unbox(jax.jit(module.init)(rng, *_imr_init_args(module.config))["params"])


def keypoint_abstract_variables(module: KeyPointEncoder):
    """``{"params": …, "batch_stats": …}`` shapes of the KeyPointEncoder without materialising them."""
    x = jnp.zeros((2, RASTER_SIZE, RASTER_SIZE, 1), jnp.float32)
    return jax.eval_shape(lambda r: module.init(r, x, train=False), jax.random.key(0))


def keypoint_init_variables(module: KeyPointEncoder, rng: jax.Array):
    """Random params and fresh running statistics (mean 0, var 1), unboxed."""
    x = jnp.zeros((2, RASTER_SIZE, RASTER_SIZE, 1), jnp.float32)
    return nn.meta.unbox(jax.jit(lambda r: module.init(r, x, train=False))(rng))
