"""Infinite-ID (ID-semantics decoupling) on the shared UNet: attention strategy, batch layout, loss
(docs/method.md §6.3, §7). The encoder's modules are :mod:`dynamicid_jax.methods.infinite_id_encoder` (re-exported
here), its weights folder :mod:`dynamicid_jax.methods.infinite_id_weights`.

**ID encoder** (:class:`InfiniteIDEncoder`): ``c_id = [M_clip(CLIP tokens); M_face(ArcFace vector)]``.

* face mapper — ``e [B, D]`` → Linear D→2D → GELU(erf) → Linear 2D→N_face·dim → reshape → LayerNorm;
* CLIP mapper — ``N_clip`` learned latent queries read the CLIP-H patch tokens through a perceiver resampler
  (``proj_in`` 1280→dim, ``depth`` × (PerceiverAttention + FeedForward), ``proj_out``, LayerNorm).

Default token counts: **4 face tokens + 16 CLIP tokens = 20 per identity**. The paper gives none. A 512-d global
ArcFace vector carries about four tokens' worth of information (IP-Adapter-FaceID and DynamicID both use 4). The
CLIP side keeps the local face structure that the paper credits to CLIP. 16 resampled tokens is IP-Adapter-Plus's
choice. Compressing the 257 patch tokens to a fixed 16 keeps the ID cross-attention cheap, and it keeps
identities cheap to stack (mixing N identities costs 20·N tokens, not 261·N). Both counts are config fields.

**Attention strategy** (:class:`InfiniteIDAttention`), selected by :class:`InfiniteIDInputs`:

* ``mode="id_only"`` (identity-enhanced training): cross-attention is ``to_out(attn(q, to_k_id(c), to_v_id(c)))``
  on the last ``num_id_tokens`` context tokens. Earlier context tokens (text) are never read; the text
  ``to_k``/``to_v`` are not even called. Self-attention is the base model's.
* ``mode="two_stream"`` (inference): the batch is ``num_groups`` (1, or 2 with CFG: ``[uncond; cond]``) groups, and
  each group is ``[text-stream rows (b); ID-stream rows (b)]``. ID row ``j`` of a group is paired with text row
  ``j`` of the same group. Every row's context is ``[text tokens; ID tokens]``. Text rows compute exactly the
  base model: they ignore the ID tokens. ID rows use:

  - self-attention in the layers of ``mix_layers`` while ``mix`` is on, mixed attention:
    ``softmax(q_id [k_id; k_t]ᵀ/√d) [v_id; v_t]``. With ``adain``, first ``k_id ← AdaIN-m(k_id, k_t)`` and
    ``v_id ← AdaIN-m(v_id, v_t)``, where ``AdaIN-m(x, r) = x − mean_tokens(x) + mean_tokens(r)``.
  - cross-attention: ``to_out(attn(q, k_t, v_t) + λ · attn(q, to_k_id(c_id), to_v_id(c_id)))``.

The new parameters are ``to_k_id`` / ``to_v_id``: bias-free, context width → inner width, in every
cross-attention layer. They plus the encoder are what training updates (:func:`split_trainable`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from dynamicid_jax.methods.infinite_id_encoder import (  # noqa: F401  (re-exported: the method's public names)
    CLIP_INPUTS,
    CLIPMapper,
    FaceMapper,
    InfiniteIDEncoder,
    InfiniteIDEncoderConfig,
    abstract_encoder_params,
    infinite_id_encoder_config,
    init_encoder_params,
    null_id_tokens,
    stack_identities,
)
from dynamicid_jax.models import layers
from dynamicid_jax.models.layers import Attention, Projections, StandardAttention
from dynamicid_jax.models.unet import merge_disjoint, split_params

__all__ = [
    "InfiniteIDEncoderConfig", "infinite_id_encoder_config", "FaceMapper", "CLIPMapper", "InfiniteIDEncoder",
    "init_encoder_params", "abstract_encoder_params", "null_id_tokens", "stack_identities",
    "InfiniteIDInputs", "InfiniteIDAttention", "two_stream_inputs", "two_stream_rows", "two_stream_context",
    "split_two_streams", "id_only_inputs", "inputs_for_step",
    "adain_mean", "mixed_attention", "self_attention_layers",
    "ID_PARAM_NAMES", "is_id_path", "split_id_params", "merge_id_params", "abstract_id_params", "init_id_params",
    "init_id_from_base", "split_trainable", "infinite_id_loss",
]



# =========================================================================================================
# Attention strategy
# =========================================================================================================
MODES = ("two_stream", "id_only")


@struct.dataclass
class InfiniteIDInputs:
    """Per-call inputs of :class:`InfiniteIDAttention` (a pytree; ``id_scale`` and ``mix`` may be traced)."""

    id_scale: jax.Array  # λ: weight of the ID cross-attention in the ID stream
    mix: jax.Array  # bool scalar: mixed self-attention on at this step
    num_id_tokens: int = struct.field(pytree_node=False, default=1)  # ID tokens at the end of every context row
    mode: str = struct.field(pytree_node=False, default="two_stream")
    num_groups: int = struct.field(pytree_node=False, default=1)  # CFG copies of [text rows; ID rows]
    adain: bool = struct.field(pytree_node=False, default=True)


def two_stream_inputs(num_id_tokens: int, *, guided: bool, id_scale: float | jax.Array = 1.0,
                      adain: bool = True, mix: bool | jax.Array = True) -> InfiniteIDInputs:
    """Inputs of the inference mode for a batch laid out ``[uncond: text, ID; cond: text, ID]`` (``guided``) or
    ``[text; ID]``."""
    if not isinstance(num_id_tokens, (int, np.integer)) or num_id_tokens < 1:
        raise ValueError(f"num_id_tokens must be a positive integer, got {num_id_tokens!r}")
    return InfiniteIDInputs(id_scale=jnp.asarray(id_scale, jnp.float32), mix=jnp.asarray(mix, jnp.bool_),
                            num_id_tokens=int(num_id_tokens), mode="two_stream", num_groups=2 if guided else 1,
                            adain=bool(adain))


def two_stream_rows(x: jax.Array) -> jax.Array:
    """One group's rows for both streams: ``[b, ...]`` → ``[text rows (b); ID rows (b)]`` (the same values, e.g.
    the start latents or SDXL's added conditioning). :func:`split_two_streams` is the inverse."""
    return jnp.concatenate([x, x], axis=0)


def two_stream_context(text: jax.Array, id_tokens: jax.Array) -> jax.Array:
    """One group's contexts: text rows ``[text; 0]`` and ID rows ``[text; ID tokens]`` → ``[2b, L + T, D]``.

    ``text [b, L, D]``; ``id_tokens [b or 1, T, D]`` (broadcast over the rows; cast to the text's dtype). Every
    row carries ``T`` ID tokens at its end, so both streams run in one UNet call; the text rows never read them."""
    tokens = jnp.broadcast_to(id_tokens.astype(text.dtype), (text.shape[0],) + id_tokens.shape[1:])
    return jnp.concatenate([jnp.concatenate([text, jnp.zeros_like(tokens)], 1),
                            jnp.concatenate([text, tokens], 1)], 0)


def split_two_streams(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One group's ``[text rows; ID rows]`` → ``(text rows, ID rows)``."""
    return tuple(jnp.split(x, 2, axis=0))


def id_only_inputs(num_id_tokens: int) -> InfiniteIDInputs:
    """Inputs of identity-enhanced training: cross-attention reads only the last ``num_id_tokens`` tokens."""
    if not isinstance(num_id_tokens, (int, np.integer)) or num_id_tokens < 1:
        raise ValueError(f"num_id_tokens must be a positive integer, got {num_id_tokens!r}")
    return InfiniteIDInputs(id_scale=jnp.float32(1.0), mix=jnp.asarray(False), num_id_tokens=int(num_id_tokens),
                            mode="id_only")


def inputs_for_step(inputs: InfiniteIDInputs, step: jax.Array | int, mix_start: jax.Array | int = 0,
                    mix_end: jax.Array | int | None = None) -> InfiniteIDInputs:
    """``inputs`` with mixing on for denoising steps ``mix_start ≤ step < mix_end`` (0-based; ``None`` = to the
    end). Pure, so a traced step inside ``lax.fori_loop`` and a Python int give the same values."""
    step = jnp.asarray(step)
    on = step >= mix_start
    if mix_end is not None:
        on = on & (step < mix_end)
    return inputs.replace(mix=on)


def adain_mean(x: jax.Array, ref: jax.Array, axis: int = 1) -> jax.Array:
    """AdaIN-mean: ``x − mean(x) + mean(ref)`` with means over the token ``axis`` (per batch row and channel;
    fp32 statistics). For split heads ``[B, L, H, D]`` the token axis is 1."""
    x32, r32 = x.astype(jnp.float32), ref.astype(jnp.float32)
    out = x32 - jnp.mean(x32, axis=axis, keepdims=True) + jnp.mean(r32, axis=axis, keepdims=True)
    return out.astype(x.dtype)


def mixed_attention(q_id, k_id, v_id, k_t, v_t, *, adain: bool, upcast: bool = False) -> jax.Array:
    """``softmax(q_id [k_id; k_t]ᵀ/√d) [v_id; v_t]`` on split heads ``[B, L, H, D]`` (keys concatenated along the
    token axis), with optional AdaIN-mean of ``k_id``/``v_id`` towards ``k_t``/``v_t``."""
    if adain:
        k_id, v_id = adain_mean(k_id, k_t), adain_mean(v_id, v_t)
    return _plain(q_id, jnp.concatenate([k_id, k_t], axis=1), jnp.concatenate([v_id, v_t], axis=1), upcast)


def _plain(q, k, v, upcast: bool) -> jax.Array:
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    return layers.dot_product_attention(q, k, v).astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class InfiniteIDAttention:
    """The Infinite-ID strategy for ``UNet2DConditionModel(config, strategy=InfiniteIDAttention(...))``.

    ``mix_layers``: indices (``attn.info.index``, diffusers' ``attn_processors`` order) of the self-attention layers
    where the ID stream uses mixed attention; ``None`` = all (the paper's figure). :func:`self_attention_layers`
    selects them by name prefix. ``attention_inputs=None`` runs the base model."""

    mix_layers: tuple[int, ...] | None = None

    def __call__(self, attn: Attention, proj: Projections, hidden: jax.Array, context: jax.Array | None,
                 inputs: Any) -> jax.Array:
        if inputs is None:
            return StandardAttention()(attn, proj, hidden, context, inputs)
        if not isinstance(inputs, InfiniteIDInputs):
            raise TypeError(f"Infinite-ID layer {attn.info.name}: attention_inputs must be InfiniteIDInputs (see "
                            f"two_stream_inputs / id_only_inputs), got {type(inputs).__name__}")
        if inputs.mode not in MODES:
            raise ValueError(f"Infinite-ID layer {attn.info.name}: mode must be one of {MODES}, got {inputs.mode!r}")
        if attn.info.kind == "self" or context is None:
            if inputs.mode == "id_only" or not self._mixes(attn):
                return self._standard_self(attn, proj, hidden)
            return self._two_stream_self(attn, proj, hidden, inputs)
        if context.shape[1] < inputs.num_id_tokens:
            raise ValueError(f"Infinite-ID layer {attn.info.name}: the context has {context.shape[1]} tokens but "
                             f"must end with {inputs.num_id_tokens} ID tokens")
        if inputs.mode == "id_only":
            return self._id_only_cross(attn, proj, hidden, context[:, context.shape[1] - inputs.num_id_tokens:])
        return self._two_stream_cross(attn, proj, hidden, context, inputs)

    def _mixes(self, attn: Attention) -> bool:
        return self.mix_layers is None or attn.info.index in self.mix_layers

    @staticmethod
    def _streams(x: jax.Array, inputs: InfiniteIDInputs, name: str) -> tuple[jax.Array, jax.Array]:
        """Rows ``[G·2·b, ...]`` → (text rows, ID rows), each ``[G·b, ...]``, pairs aligned."""
        g = inputs.num_groups
        if x.shape[0] % (2 * g):
            raise ValueError(f"Infinite-ID layer {name}: batch of {x.shape[0]} rows cannot be {g} group(s) of "
                             f"[text rows; ID rows] of equal size")
        b = x.shape[0] // (2 * g)
        s = x.reshape((g, 2, b) + x.shape[1:])
        return s[:, 0].reshape((g * b,) + x.shape[1:]), s[:, 1].reshape((g * b,) + x.shape[1:])

    @staticmethod
    def _join(text: jax.Array, ids: jax.Array, inputs: InfiniteIDInputs) -> jax.Array:
        g = inputs.num_groups
        b = text.shape[0] // g
        s = jnp.stack([text.reshape((g, b) + text.shape[1:]), ids.reshape((g, b) + ids.shape[1:])], axis=1)
        return s.reshape((2 * g * b,) + text.shape[1:])

    def _standard_self(self, attn, proj, hidden):
        q, k, v = (attn.split_heads(f(hidden)) for f in (proj.q, proj.k, proj.v))
        return proj.out(attn.merge_heads(attn.attend(q, k, v)))

    def _two_stream_self(self, attn, proj, hidden, inputs):
        q, k, v = (attn.split_heads(f(hidden)) for f in (proj.q, proj.k, proj.v))
        (q_t, q_i), (k_t, k_i), (v_t, v_i) = (self._streams(x, inputs, attn.info.name) for x in (q, k, v))
        h_t = _plain(q_t, k_t, v_t, attn.upcast)
        upcast, adain = attn.upcast, inputs.adain
        h_i = jax.lax.cond(
            inputs.mix,
            lambda a: mixed_attention(*a, adain=adain, upcast=upcast),
            lambda a: _plain(a[0], a[1], a[2], upcast),
            (q_i, k_i, v_i, k_t, v_t))
        return proj.out(attn.merge_heads(self._join(h_t, h_i, inputs)))

    @staticmethod
    def _id_kv(attn, ids):
        inner = attn.heads * attn.head_dim
        k = layers.dense(inner, name="to_k_id", use_bias=False, dtype=attn.dtype)(ids)
        v = layers.dense(inner, name="to_v_id", use_bias=False, dtype=attn.dtype)(ids)
        return attn.split_heads(k), attn.split_heads(v)

    def _id_only_cross(self, attn, proj, hidden, ids):
        q = attn.split_heads(proj.q(hidden))
        k_id, v_id = self._id_kv(attn, ids)
        return proj.out(attn.merge_heads(attn.attend(q, k_id, v_id)))

    def _two_stream_cross(self, attn, proj, hidden, context, inputs):
        n_text = context.shape[1] - inputs.num_id_tokens
        if n_text < 1:
            raise ValueError(f"Infinite-ID layer {attn.info.name}: two-stream mode needs text tokens before the "
                             f"{inputs.num_id_tokens} ID tokens, got a context of {context.shape[1]}")
        text, ids = context[:, :n_text], context[:, n_text:]
        q = attn.split_heads(proj.q(hidden))
        h_txt = attn.attend(q, attn.split_heads(proj.k(text)), attn.split_heads(proj.v(text)))
        h_t, h_i = self._streams(h_txt, inputs, attn.info.name)
        _, q_i = self._streams(q, inputs, attn.info.name)
        k_id, v_id = self._id_kv(attn, self._streams(ids, inputs, attn.info.name)[1])
        h_id = attn.attend(q_i, k_id, v_id)
        h_i = (h_i.astype(jnp.float32) + inputs.id_scale * h_id.astype(jnp.float32)).astype(h_i.dtype)
        return proj.out(attn.merge_heads(self._join(h_t, h_i, inputs)))


def self_attention_layers(unet_config, prefixes: Sequence[str] | None = None) -> tuple[int, ...]:
    """Indices of the self-attention layers whose diffusers names start with one of ``prefixes`` (e.g.
    ``("up_blocks", "mid_block")`` or ``("down_blocks.0",)``); ``None`` → all. For ``mix_layers``."""
    from dynamicid_jax.models.unet import attention_layer_names

    names = attention_layer_names(unet_config)
    if prefixes is not None:
        prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        unused = [p for p in prefixes if not any(n.startswith(p) and n.endswith("attn1") for n in names)]
        if unused:
            raise ValueError(f"mix layer prefixes {unused} match no self-attention layer; names look like "
                             f"{names[0]!r} / 'mid_block.attentions.0…'")
    return tuple(i for i, n in enumerate(names) if n.endswith("attn1")
                 and (prefixes is None or any(n.startswith(p) for p in prefixes)))


# =========================================================================================================
# Parameters
# =========================================================================================================
ID_PARAM_NAMES = ("to_k_id", "to_v_id")


def is_id_path(path: tuple[str, ...]) -> bool:
    return any(p in ID_PARAM_NAMES for p in path)


def split_id_params(params: Mapping) -> tuple[dict, dict]:
    """UNet params (base + ID projections) → ``(base, id_projections)``."""
    return split_params(params, is_id_path)


def merge_id_params(base: Mapping, id_params: Mapping) -> dict:
    """Join the base UNet params and the ID projections (disjoint trees)."""
    return merge_disjoint(base, id_params, "ID projection params")


def _id_module_and_args(unet_config):
    from dynamicid_jax.models.unet import UNet2DConditionModel, dummy_added_cond

    module = UNet2DConditionModel(unet_config, strategy=InfiniteIDAttention())
    f = 2 ** (len(unet_config.block_out_channels) - 1)
    args = (jnp.zeros((1, f, f, unet_config.in_channels), jnp.float32), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 1, unet_config.cross_attention_dim), jnp.float32), id_only_inputs(1))
    return module, args + (dummy_added_cond(unet_config),) if unet_config.text_time else args


def abstract_id_params(unet_config) -> dict:
    """Shapes (boxed, with logical axes) of the ``to_k_id``/``to_v_id`` params for a UNet config."""
    module, args = _id_module_and_args(unet_config)
    return split_id_params(jax.eval_shape(lambda r: module.init(r, *args)["params"], jax.random.key(0)))[1]


def init_id_params(unet_config, rng: jax.Array) -> dict:
    """Fresh ``to_k_id``/``to_v_id`` (lecun-normal; :func:`init_id_from_base` gives the training init). Only
    these are materialised: under ``jit`` the base UNet's initialisers are dead code."""
    module, args = _id_module_and_args(unet_config)
    return jax.jit(lambda r: split_id_params(nn.meta.unbox(module.init(r, *args)["params"]))[1])(rng)


def init_id_from_base(base: Mapping, id_params: Mapping) -> dict:
    """ID projections initialised from each cross-attention's text ``to_k``/``to_v`` (the training init)."""
    flat_base = traverse_util.flatten_dict(dict(base))
    out = {}
    for path, value in traverse_util.flatten_dict(dict(id_params)).items():
        src = path[:-2] + (path[-2][:-3], path[-1])  # .../to_k_id/kernel ← .../to_k/kernel
        if src not in flat_base:
            raise ValueError(f"init_id_from_base: base params lack {'/'.join(src)}")
        if tuple(flat_base[src].shape) != tuple(value.shape):
            raise ValueError(f"{'/'.join(src)} {tuple(flat_base[src].shape)} cannot initialise "
                             f"{'/'.join(path)} {tuple(value.shape)}")
        out[path] = jnp.array(flat_base[src])
    return traverse_util.unflatten_dict(out)


def split_trainable(unet_params: Mapping, encoder_params: Mapping) -> tuple[dict, dict]:
    """``(trainable, frozen)``: trainable = ``{"encoder": mappers, "id_projections": to_k_id/to_v_id}``, frozen =
    ``{"unet": the base UNet}`` (VAE, text encoder, ArcFace and CLIP are outside the loss altogether)."""
    base, ids = split_id_params(unet_params)
    if not traverse_util.flatten_dict(ids):
        raise ValueError("split_trainable: the UNet params hold no to_k_id / to_v_id (merge init_id_params first)")
    return {"encoder": dict(encoder_params), "id_projections": ids}, {"unet": base}


# =========================================================================================================
# Identity-enhanced training loss
# =========================================================================================================
def infinite_id_loss(trainable: Mapping, frozen: Mapping, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                     unet, encoder: InfiniteIDEncoder, scheduler, id_dropout: float = 0.05,
                     scaling_factor: float = 0.18215, vae_scale_factor: int = 8) -> tuple[jax.Array, dict]:
    """ε-MSE (v-MSE for v-prediction schedulers) conditioned only on ID tokens; text is never computed.

    ``unet`` has :class:`InfiniteIDAttention`; ``trainable``/``frozen`` as :func:`split_trainable` returns, and
    ``frozen["null_clip_features"]`` ``[1, L, clip_dim]`` holds the CLIP features of the all-zero normalised image.
    ``batch``: ``id_embeds [B, D]``, ``clip_features [B, L, clip_dim]``, and either ``latents [B, h, w, 4]``
    (already × scaling factor) or ``latent_mean`` + ``latent_logvar`` (the VAE posterior; sampled here and ×
    ``scaling_factor``). Draws per sample: ``t`` uniform over the training timesteps, the noise, and the
    dropout of ``c_id`` to the null tokens (prob. ``id_dropout``, so CFG is possible). Returns ``(loss, aux)``.

    On SDXL (a ``text_time`` UNet) the added conditioning is that of an empty text (zero pooled embedding, as
    SDXL's zeroed unconditional prompt) and micro-conditioning ids ``(H, W, 0, 0, H, W)`` of the image size
    (latent size × ``vae_scale_factor``): text is never computed in this loss.
    """
    missing = [k for k in ("id_embeds", "clip_features") if k not in batch]
    if "latents" not in batch and not ("latent_mean" in batch and "latent_logvar" in batch):
        missing.append("latents (or latent_mean + latent_logvar)")
    if missing:
        raise KeyError(f"infinite_id_loss: batch lacks {missing}; it has {sorted(batch)}")
    ids, clip = jnp.asarray(batch["id_embeds"]), jnp.asarray(batch["clip_features"])
    r_t, r_noise, r_drop, r_lat = jax.random.split(rng, 4)
    if "latents" in batch:
        latents = jnp.asarray(batch["latents"], jnp.float32)
    else:
        mean = jnp.asarray(batch["latent_mean"], jnp.float32)
        std = jnp.exp(0.5 * jnp.clip(jnp.asarray(batch["latent_logvar"], jnp.float32), -30.0, 20.0))
        latents = (mean + std * jax.random.normal(r_lat, mean.shape)) * scaling_factor
    b = latents.shape[0]
    if ids.shape[0] != b or clip.shape[0] != b:
        raise ValueError(f"infinite_id_loss: batch sizes differ (latents {b}, id_embeds {ids.shape[0]}, "
                         f"clip_features {clip.shape[0]})")
    tokens = encoder.apply({"params": trainable["encoder"]}, ids, clip)
    null = null_id_tokens(encoder, trainable["encoder"], jnp.asarray(frozen["null_clip_features"]))
    drop = jax.random.uniform(r_drop, (b,)) < id_dropout
    tokens = jnp.where(drop[:, None, None], null.astype(tokens.dtype), tokens)
    n_train = scheduler.config.num_train_timesteps
    t = jax.random.randint(r_t, (b,), 0, n_train)
    noise = jax.random.normal(r_noise, latents.shape, jnp.float32)
    noisy = scheduler.add_noise(latents, noise, t)
    target = scheduler.get_velocity(latents, noise, t) if scheduler.config.prediction_type == "v_prediction" \
        else noise
    params = merge_id_params(frozen["unet"], trainable["id_projections"])
    extra = ()
    if unet.config.text_time:
        from dynamicid_jax.models.unet import micro_conditioning

        extra = ({"text_embeds": jnp.zeros((b, unet.config.pooled_text_dim), jnp.float32),
                  "time_ids": micro_conditioning(b, latents.shape[1:3], vae_scale_factor)},)
    pred = unet.apply({"params": params}, noisy.astype(unet.dtype), t, tokens,
                      id_only_inputs(encoder.config.num_tokens), *extra)
    loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - target))
    return loss, {"loss": loss, "id_dropped": jnp.mean(drop.astype(jnp.float32)),
                  "timestep_mean": jnp.mean(t.astype(jnp.float32))}
