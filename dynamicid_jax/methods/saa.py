"""DynamicID's Semantic-Activated Attention (SAA) as an attention strategy for the UNet (docs/method.md §4).

``UNet2DConditionModel(config, strategy=SAA())`` turns every attention layer into SAA. Self-attention (``attn1``)
gets rank-``r`` LoRA on ``to_q``/``to_k``/``to_v``/``to_out``. Cross-attention (``attn2``) reads the context
``[text tokens | ID₀ ×4 | … | ID_{N−1} ×4]``: LoRA'd attention on the text tokens, plus an ID branch with its own
bias-free ``to_k_ip``/``to_v_ip``, added through a per-query gate ``w`` (``out = to_out(h_txt + id_scale · w ⊙
h_id) + to_out_lora(…)``). The gate, the layout boost, routing and mixing are docs/method.md §4.3–§4.4; each is a
pure function below, and the boxes and attention grids they use are the section "Boxes and grids".

Per-call values travel as :class:`SAAInputs` (``unet.apply(..., attention_inputs=inputs)``, built by
:func:`saa_inputs`; the boost per denoising step by :func:`saa_inputs_for_step`). Every cross-attention sows its
gate as ``intermediates/…/attn2/gate`` ``[B, L_q]`` (:func:`dynamicid_jax.pipelines.gates.gate_maps` reshapes them
onto the layer grids). Parameters live inside each attention module under the official names (``to_q_lora/down``,
…, ``to_k_ip``, ``to_v_ip``): :func:`init_saa_params` creates them, :func:`merge_params` joins them with the base
UNet's, :func:`init_ip_from_base` copies ``to_k``/``to_v`` into ``to_k_ip``/``to_v_ip`` (the training
initialisation); :mod:`dynamicid_jax.methods.dynamicid_official` imports the official ``SAA.bin``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from dynamicid_jax.errors import InputError
from dynamicid_jax.models import layers
from dynamicid_jax.models.layers import Attention, Projections
from dynamicid_jax.models.unet import merge_disjoint, split_params

__all__ = [
    "SAA", "LoRA", "SAAInputs", "saa_inputs", "saa_inputs_for_step", "saa_context", "split_saa_context",
    "boost_strength", "layout_boxes",
    "validate_boxes", "layer_grid", "query_grids", "box_edges", "gate_from_logits", "box_masks", "boost_gate",
    "routing_mask", "mixing_factors", "SAA_PARAM_NAMES", "is_saa_path", "split_saa_params", "merge_params",
    "abstract_saa_params", "init_saa_params", "init_ip_from_base",
]

# Names of the modules SAA adds inside an attention layer (also the official SAA.bin names).
SAA_PARAM_NAMES = ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora", "to_k_ip", "to_v_ip")


# =========================================================================================================
# Modules
# =========================================================================================================
class LoRA(nn.Module):
    """``up(down(x))`` with ``down [in, r] ~ N(0, 1/r)`` and ``up [r, out] = 0`` (no biases), as diffusers'
    ``LoRALinearLayer`` with ``network_alpha=None``."""

    features: int
    rank: int
    in_axis: str | None = "embed"
    out_axis: str | None = "mlp"
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        down = nn.Dense(self.rank, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="down",
                        kernel_init=nn.with_logical_partitioning(_initializer("down", self.rank),
                                                                 (self.in_axis, None)))
        up = nn.Dense(self.features, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="up",
                      kernel_init=nn.with_logical_partitioning(_initializer("up", self.rank), (None, self.out_axis)))
        return up(down(x))


def _initializer(kind: str, rank: int = 1):
    """The one place SAA's initialisers are defined (used by the modules and by :func:`init_saa_params`)."""
    if kind == "down":
        return nn.initializers.normal(1.0 / rank)
    if kind == "up":
        return nn.initializers.zeros_init()
    return nn.initializers.lecun_normal()  # to_k_ip / to_v_ip (layers.dense's default)


@struct.dataclass
class SAAInputs:
    """Per-call inputs of :class:`SAA` (a pytree: the arrays may be traced, the rest is static).

    Build with :func:`saa_inputs`. ``box_edges[g, i] = (y0, x0, y1, x1)`` are box ``i``'s half-open cell ranges
    on the grid ``grids[g]`` (computed on the host in float64 with ``int()`` truncation, as the official code)."""

    id_scale: jax.Array  # scalar: weight of the ID branch
    strength: jax.Array  # scalar: layout boost s (0 = none); see saa_inputs_for_step
    mix: jax.Array  # scalar: logit weight of identity 0 in "mix" mode
    boxes: jax.Array  # [n_boxes, 4] normalised [y0, x0, y1, x1] (for reference; the edges below are used)
    box_edges: jax.Array  # int32 [n_grids, n_boxes, 4]
    num_ids: int = struct.field(pytree_node=False, default=1)
    mode: str = struct.field(pytree_node=False, default="route")  # "route" (N boxes) or "mix" (1 box, N > 1)
    activate_query: bool = struct.field(pytree_node=False, default=True)
    image_size: tuple[int, int] = struct.field(pytree_node=False, default=(512, 512))  # (height, width) px
    grids: tuple[tuple[int, int], ...] = struct.field(pytree_node=False, default=())


@dataclasses.dataclass(frozen=True)
class SAA:
    """The SAA attention strategy (frozen, hashable): LoRA in every attention layer plus the gated, routed ID
    branch in every cross-attention.

    ``lora_rank``: rank of the four LoRAs per layer (128 in the official checkpoint); ``num_id_tokens``: tokens
    per identity at the end of the context; ``threshold``: gate values below it become 0; ``eps``: added to the
    min–max denominator (constant logits → gate 0, not NaN); ``lora_scale``: multiplies every LoRA output."""

    lora_rank: int = 128
    num_id_tokens: int = 4
    threshold: float = 0.3
    eps: float = 1e-6
    lora_scale: float = 1.0

    def __call__(self, attn: Attention, proj: Projections, hidden: jax.Array, context: jax.Array | None,
                 inputs: Any) -> jax.Array:
        if attn.info.kind == "self" or context is None:
            return self._self_attention(attn, proj, hidden)
        return self._cross_attention(attn, proj, hidden, context, inputs)

    # ---- pieces ---------------------------------------------------------------------------------------------
    def _lora(self, attn: Attention, name: str, features: int, x: jax.Array, out: bool = False) -> jax.Array:
        axes = ("mlp", "embed") if out else ("embed", "mlp")
        y = LoRA(features, self.lora_rank, *axes, dtype=attn.dtype, name=name)(x)
        return y if self.lora_scale == 1.0 else y * self.lora_scale

    def _qkv(self, attn: Attention, proj: Projections, hidden: jax.Array, source: jax.Array):
        inner = attn.heads * attn.head_dim
        q = proj.q(hidden) + self._lora(attn, "to_q_lora", inner, hidden)
        k = proj.k(source) + self._lora(attn, "to_k_lora", inner, source)
        v = proj.v(source) + self._lora(attn, "to_v_lora", inner, source)
        return q, k, v

    def _out(self, attn: Attention, proj: Projections, h: jax.Array) -> jax.Array:
        return proj.out(h) + self._lora(attn, "to_out_lora", proj.out.features, h, out=True)

    def _self_attention(self, attn, proj, hidden):
        q, k, v = self._qkv(attn, proj, hidden, hidden)
        h = attn.merge_heads(attn.attend(attn.split_heads(q), attn.split_heads(k), attn.split_heads(v)))
        return self._out(attn, proj, h)

    def _cross_attention(self, attn, proj, hidden, context, inputs):
        if not isinstance(inputs, SAAInputs):
            raise TypeError(f"SAA layer {attn.info.name}: attention_inputs must be SAAInputs (build them with "
                            f"saa_inputs(...)), got {type(inputs).__name__}")
        text, ids = split_saa_context(context, inputs.num_ids, self.num_id_tokens,
                                      where=f"SAA layer {attn.info.name}")
        q, k, v = self._qkv(attn, proj, hidden, text)
        q = attn.split_heads(q)
        h_txt = attn.merge_heads(attn.attend(q, attn.split_heads(k), attn.split_heads(v)))

        inner = attn.heads * attn.head_dim

        def ip(name):
            init = nn.with_logical_partitioning(_initializer("ip"), ("embed", "mlp"))
            return attn.split_heads(layers.dense(inner, name=name, use_bias=False, dtype=attn.dtype,
                                                 kernel_init=init)(ids))

        k_id, v_id = ip("to_k_ip"), ip("to_v_ip")
        q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k_id, v_id))

        batch, n_query = hidden.shape[0], hidden.shape[1]
        mask = None
        if inputs.activate_query:
            w = gate_from_logits(attn.logits(q, k_id), self.threshold, self.eps)  # unmasked S, fp32 [B, Lq]
            grid = layer_grid(n_query, inputs.image_size)
            if grid not in inputs.grids or grid[0] * grid[1] != n_query:
                raise ValueError(f"SAA layer {attn.info.name}: {n_query} query tokens do not form a grid of an image "
                                 f"of {inputs.image_size[0]}×{inputs.image_size[1]} px (height × width); build "
                                 f"SAAInputs with the generated image's size")
            in_box = box_masks(inputs.box_edges[inputs.grids.index(grid)], grid)  # [n_boxes, Lq]
            w = boost_gate(w, jnp.any(in_box, axis=0), inputs.strength)
            if inputs.mode == "route" and inputs.num_ids > 1:  # (one identity: nothing to route)
                mask = routing_mask(in_box, self.num_id_tokens)[None, None]  # [1, 1, Lq, 4N]
            elif inputs.mode == "mix":  # scaling the keys of a token scales its logits
                k32 = k32 * mixing_factors(inputs.num_ids, self.num_id_tokens, inputs.mix)[None, :, None, None]
        else:
            w = jnp.ones((batch, n_query), jnp.float32)
        attn.sow("intermediates", "gate", w)
        h_id = attn.merge_heads(layers.dot_product_attention(q32, k32, v32, mask=mask))  # fp32 softmax
        h = h_txt.astype(jnp.float32) + inputs.id_scale * (w[..., None] * h_id)
        return self._out(attn, proj, h.astype(attn.dtype))


# =========================================================================================================
# Boxes and grids (docs/method.md §4.4)
# =========================================================================================================
# Boxes are normalised ``[y_min, x_min, y_max, x_max]``; :func:`validate_boxes` checks user boxes and picks routing
# (one box per identity) or mixing (one box for several), :func:`layout_boxes` gives the default boxes without user
# boxes. Each attention layer sees the image as a grid of query tokens (:func:`layer_grid`, :func:`query_grids`);
# :func:`box_edges` turns boxes into cell ranges on a grid and :func:`box_masks` into per-token masks.


def layout_boxes(num_ids: int, layout: str | Sequence[float] = "row") -> np.ndarray:
    """Default boxes for ``num_ids`` identities without user boxes (docs/method.md §4.4 "beyond the paper").

    * ``"row"`` — equal vertical strips left → right, box ``i = [0, i/N, 1, (i+1)/N]`` (the official default);
    * ``"grid"`` — ``ceil(√N)`` columns, filled row by row top → bottom; every row is split into equal cells
      (a last, shorter row gets wider cells), rows have equal heights;
    * a sequence of ``N`` positive relative widths — vertical strips left → right with those widths.

    One identity always gets the whole image. Returns float64 ``[N, 4]`` normalised ``[y0, x0, y1, x1]``."""
    if not isinstance(num_ids, (int, np.integer)) or num_ids < 1:
        raise ValueError(f"num_ids must be a positive integer, got {num_ids!r}")
    if num_ids == 1:
        return np.array([[0.0, 0.0, 1.0, 1.0]])
    if isinstance(layout, str):
        if layout == "row":
            step = 1 / num_ids
            return np.array([[0.0, step * i, 1.0, step * (i + 1)] for i in range(num_ids)])
        if layout == "grid":
            cols = math.ceil(math.sqrt(num_ids))
            rows = math.ceil(num_ids / cols)
            boxes = []
            for r in range(rows):
                n = min(cols, num_ids - r * cols)
                boxes += [[r / rows, c / n, (r + 1) / rows, (c + 1) / n] for c in range(n)]
            return np.array(boxes)
        raise ValueError(f"layout must be 'row', 'grid' or a list of {num_ids} relative widths, got {layout!r}")
    widths = np.asarray(layout, np.float64).reshape(-1)
    if widths.shape[0] != num_ids or not np.all(np.isfinite(widths)) or np.any(widths <= 0):
        raise ValueError(f"layout widths must be {num_ids} positive numbers (one per identity), got {list(layout)}")
    edges = np.concatenate([[0.0], np.cumsum(widths) / widths.sum()])
    edges[-1] = 1.0
    return np.array([[0.0, edges[i], 1.0, edges[i + 1]] for i in range(num_ids)])


def validate_boxes(boxes: Any, num_ids: int) -> tuple[np.ndarray, str]:
    """Check user boxes → ``(boxes float64 [n, 4], mode)``; mode ``"route"`` (one box per identity) or ``"mix"``
    (one box for several identities). Raises ``ValueError`` for other counts, values outside ``[0, 1]``, empty
    or inverted boxes and overlapping boxes (the official code would produce NaN there)."""
    arr = np.asarray(boxes, np.float64)
    if arr.ndim == 1 and arr.shape == (4,):
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4 or arr.shape[0] < 1:
        raise ValueError(f"boxes must be [n, 4] normalised [y_min, x_min, y_max, x_max], got shape {arr.shape}")
    n = arr.shape[0]
    if n == num_ids:
        mode = "route"
    elif n == 1:
        mode = "mix"
    else:
        raise ValueError(f"got {n} boxes for {num_ids} identities: give one box per identity (regional routing) "
                         f"or a single box (identity mixing)")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ValueError(f"boxes must lie in [0, 1] (normalised [y_min, x_min, y_max, x_max]), got {arr.tolist()}")
    bad = [i for i in range(n) if not (arr[i, 0] < arr[i, 2] and arr[i, 1] < arr[i, 3])]
    if bad:
        raise ValueError(f"boxes {bad} are empty or inverted: need y_min < y_max and x_min < x_max, got "
                         f"{arr[bad].tolist()}")
    for i in range(n):
        for j in range(i + 1, n):
            dy = min(arr[i, 2], arr[j, 2]) - max(arr[i, 0], arr[j, 0])
            dx = min(arr[i, 3], arr[j, 3]) - max(arr[i, 1], arr[j, 1])
            if dy > 0 and dx > 0:
                raise ValueError(f"boxes {i} {arr[i].tolist()} and {j} {arr[j].tolist()} overlap; each query "
                                 f"may belong to one identity only")
    return arr, mode


def layer_grid(query_len: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """The ``(H_l, W_l)`` grid of a layer with ``query_len`` tokens for an image of ``image_size = (H, W)`` px:
    ``ratio = int(sqrt(W·H // L_q))``, grid ``(H // ratio, W // ratio)`` (docs/method.md §4.4; the official code's
    rule)."""
    height, width = image_size
    ratio = int(math.sqrt(width * height // query_len)) if query_len <= width * height else 0
    if ratio < 1:
        raise ValueError(f"{query_len} query tokens are more than the {height}×{width} px image has pixels")
    return height // ratio, width // ratio


def query_grids(image_size: tuple[int, int], max_levels: int = 8) -> tuple[tuple[int, int], ...]:
    """The grids of the UNet's attention levels for an image of ``(H, W)`` px: latent ``(H/8, W/8)`` and each
    halving while both sides stay integers (SD1.5 at 512×768 → 64×96, 32×48, 16×24, 8×12), then the finer grids
    ``(H/4, W/4)``, ``(H/2, W/2)``, ``(H, W)`` of VAEs with a smaller scale factor (e.g. 4 for a 3-level VAE)."""
    height, width = image_size
    grids = []
    factors = [8 * 2 ** level for level in range(max_levels)]
    factors = [r for i, r in enumerate(factors) if all(height % q == 0 and width % q == 0 for q in factors[:i + 1])]
    for r in factors + [4, 2, 1]:
        if height % r or width % r:
            continue
        grid = layer_grid((height // r) * (width // r), image_size)
        if grid != (height // r, width // r):  # cannot happen for exact multiples; kept as a guard
            raise AssertionError(f"grid rule mismatch at {image_size}: {grid}")
        grids.append(grid)
    return tuple(grids)


def box_edges(boxes: np.ndarray | Sequence[Sequence[float]], grid: tuple[int, int]) -> np.ndarray:
    """Normalised boxes ``[n, 4]`` → integer cell ranges on ``grid = (H_l, W_l)``: ``int(y0·H_l), int(x0·W_l),
    int(y1·H_l), int(x1·W_l)`` with Python floats (truncation), used as half-open slices."""
    gh, gw = grid
    return np.array([[int(float(y0) * gh), int(float(x0) * gw), int(float(y1) * gh), int(float(x1) * gw)]
                     for y0, x0, y1, x1 in np.asarray(boxes, np.float64)], np.int32).reshape(-1, 4)


def box_masks(edges: jax.Array | np.ndarray, grid: tuple[int, int]) -> jax.Array | np.ndarray:
    """``edges [n_boxes, 4]`` (half-open cell ranges ``y0, x0, y1, x1``) → boolean ``[n_boxes, H_l·W_l]``,
    row-major over the grid (the order of the UNet's flattened tokens). NumPy in → NumPy out."""
    xp = np if isinstance(edges, np.ndarray) else jnp
    gh, gw = grid
    ys = xp.arange(gh)[None, :, None]
    xs = xp.arange(gw)[None, None, :]
    e = [edges[:, i][:, None, None] for i in range(4)]
    inside = (ys >= e[0]) & (ys < e[2]) & (xs >= e[1]) & (xs < e[3])
    return inside.reshape(edges.shape[0], gh * gw)


# =========================================================================================================
# Gate, routing, mixing (pure functions; the strategy composes them)
# =========================================================================================================
def gate_from_logits(logits: jax.Array, threshold: float = 0.3, eps: float = 1e-6) -> jax.Array:
    """``[B, heads, Lq, T]`` ID logits → gate ``[B, Lq]`` in fp32: sum over heads and tokens, min–max normalise
    over the queries of each batch row (``(g − min)/(max − min + eps)``), zero where below ``threshold``."""
    g = jnp.sum(logits.astype(jnp.float32), axis=(1, 3))
    lo, hi = jnp.min(g, axis=1, keepdims=True), jnp.max(g, axis=1, keepdims=True)
    w = (g - lo) / (hi - lo + eps)
    return jnp.where(w < threshold, 0.0, w)


def boost_gate(w: jax.Array, in_any_box: jax.Array, strength: jax.Array | float) -> jax.Array:
    """The layout boost: ``w/(s+1)`` everywhere, then ``w·(s+1) + s`` inside the boxes (so an in-box query that
    was thresholded to 0 ends at exactly ``s``). ``in_any_box`` is ``[Lq]``; ``s = 0`` leaves ``w`` unchanged."""
    s = jnp.asarray(strength, jnp.float32)
    w = w / (s + 1.0)
    return jnp.where(in_any_box[None, :], w * (s + 1.0) + s, w)


def routing_mask(in_box: jax.Array, tokens_per_id: int) -> jax.Array:
    """``in_box [N, Lq]`` → ``[Lq, N·tokens_per_id]`` True = may attend: a query inside box ``i`` sees only
    identity ``i``'s tokens; a query outside every box sees all of them."""
    owner = jnp.arange(in_box.shape[0] * tokens_per_id) // tokens_per_id
    allowed = in_box.T[:, owner]  # [Lq, T]: the query lies in the box of the token's identity
    return jnp.where(jnp.any(in_box, axis=0)[:, None], allowed, True)


def mixing_factors(num_ids: int, tokens_per_id: int, mix: jax.Array | float) -> jax.Array:
    """Per-token logit factors of identity mixing: ``mix`` for identity 0's tokens, ``1 − mix`` for the rest."""
    mix = jnp.asarray(mix, jnp.float32)
    first = jnp.arange(num_ids * tokens_per_id) < tokens_per_id
    return jnp.where(first, mix, 1.0 - mix)


# =========================================================================================================
# Inputs: per-call values, the per-step boost, the context layout
# =========================================================================================================
def saa_inputs(num_ids: int, image_size: tuple[int, int], boxes: Any = None, *, id_scale: float = 1.0,
               strength: float = 0.0, mix: float = 0.5, activate_query: bool = True,
               layout: str | Sequence[float] = "row", latent_grid: tuple[int, int] | None = None) -> SAAInputs:
    """Build :class:`SAAInputs` on the host (validates the boxes, maps them onto every attention grid).

    ``image_size`` is the generated image's ``(height, width)`` in pixels (multiples of 8), as the official code
    uses it; each layer's grid follows from its query count and this aspect ratio (:func:`layer_grid`). ``boxes`` are
    normalised ``[y_min, x_min, y_max, x_max]``: one per identity (routing) or one for several identities
    (mixing with weight ``mix`` for identity 0); ``None`` → the whole image for one identity, else
    :func:`layout_boxes` ``(num_ids, layout)``. ``strength`` is the boost s (use :func:`saa_inputs_for_step` in
    a sampler). ``activate_query=False`` → gate 1, no boost, routing or mixing (the "w/o SAA" baseline and the
    stage-2 training mode). ``latent_grid`` (the UNet input's ``(h, w)``): refuse boxes that cover none of its
    cells (the finest grid any attention layer sees)."""
    if not isinstance(num_ids, (int, np.integer)) or num_ids < 1:
        raise ValueError(f"num_ids must be a positive integer, got {num_ids!r}")
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (height, width) in pixels, got {image_size!r}") from None
    if height <= 0 or width <= 0 or height % 8 or width % 8:
        raise ValueError(f"image_size must be positive multiples of 8 px (height, width), got {image_size!r}")
    if not 0.0 <= float(mix) <= 1.0:
        raise ValueError(f"mix must lie in [0, 1], got {mix}")
    arr, mode = validate_boxes(layout_boxes(num_ids, layout) if boxes is None else boxes, num_ids)
    grids = query_grids((height, width))
    edges = np.stack([box_edges(arr, g) for g in grids])
    if latent_grid is not None:
        gh, gw = latent_grid
        for i, (y0, x0, y1, x1) in enumerate(box_edges(arr, latent_grid)):
            if y1 <= y0 or x1 <= x0:  # no query of any layer lies in it: its identity would be injected nowhere
                raise InputError(f"box {i} {[round(float(v), 4) for v in arr[i]]} covers no cell of the {gh}×{gw} "
                                 f"latent grid of a {height}×{width} image: each box side must span at least one "
                                 f"latent cell ({height / gh:g} px high, {width / gw:g} px wide here)")
    return SAAInputs(id_scale=jnp.float32(id_scale), strength=jnp.float32(strength), mix=jnp.float32(mix),
                     boxes=jnp.asarray(arr, jnp.float32), box_edges=jnp.asarray(edges, jnp.int32),
                     num_ids=int(num_ids), mode=mode, activate_query=bool(activate_query),
                     image_size=(height, width), grids=grids)


def boost_strength(step: jax.Array | int, boost_steps: jax.Array | int, strength: jax.Array | float) -> jax.Array:
    """``strength`` for denoising steps ``step < boost_steps``, else 0 (fp32 scalar; jit- and eager-safe)."""
    return jnp.where(jnp.asarray(step) < boost_steps, jnp.asarray(strength, jnp.float32), jnp.float32(0.0))


def saa_context(text: jax.Array, id_tokens: jax.Array) -> jax.Array:
    """The cross-attention context SAA reads: ``[text tokens | ID tokens]`` along the sequence (docs/method.md §4).

    ``text [B, L, D]``; ``id_tokens [B, T, D]`` or ``[1, T, D]`` (one set for every row), ``T`` = identities × ID
    tokens each, identity by identity. The ID tokens take the text's dtype. :func:`split_saa_context` is the
    inverse; these two are the only places that know the layout."""
    tokens = id_tokens.astype(text.dtype)
    if tokens.ndim != 3 or tokens.shape[-1] != text.shape[-1] or tokens.shape[0] not in (1, text.shape[0]):
        raise ValueError(f"id_tokens must be [B, T, {text.shape[-1]}] or [1, T, {text.shape[-1]}] beside text "
                         f"{tuple(text.shape)}, got {tuple(id_tokens.shape)}")
    tokens = jnp.broadcast_to(tokens, (text.shape[0],) + tokens.shape[1:])
    return jnp.concatenate([text, tokens], axis=1)


def split_saa_context(context: jax.Array, num_ids: int, num_id_tokens: int, *,
                      where: str = "SAA") -> tuple[jax.Array, jax.Array]:
    """``(text [B, L, D], id_tokens [B, num_ids·num_id_tokens, D])`` of a :func:`saa_context` context."""
    n_id = num_ids * num_id_tokens
    if context.shape[1] <= n_id:
        raise ValueError(f"{where}: the context has {context.shape[1]} tokens but must hold text tokens followed "
                         f"by {num_ids} × {num_id_tokens} ID tokens")
    return context[:, :-n_id], context[:, -n_id:]


def saa_inputs_for_step(inputs: SAAInputs, step: jax.Array | int, boost_steps: jax.Array | int,
                        strength: jax.Array | float) -> SAAInputs:
    """``inputs`` with the boost of denoising step ``step`` (0-based): ``strength`` while ``step < boost_steps``,
    0 afterwards. Pure: gives the same values for a traced step inside ``lax.fori_loop`` and for a Python int."""
    return inputs.replace(strength=boost_strength(step, boost_steps, strength))


# =========================================================================================================
# Parameters
# =========================================================================================================
def is_saa_path(path: tuple[str, ...]) -> bool:
    """Whether a flattened param path belongs to SAA (a LoRA or an ``*_ip`` projection)."""
    return any(p in SAA_PARAM_NAMES for p in path)


def split_saa_params(params: Mapping) -> tuple[dict, dict]:
    """``params`` (UNet + SAA) → ``(base, saa)`` nested dicts."""
    return split_params(params, is_saa_path)


def merge_params(base: Mapping, saa: Mapping) -> dict:
    """Join base UNet params with SAA params (disjoint trees) into what ``UNet(strategy=SAA())`` applies with."""
    return merge_disjoint(base, saa, "SAA params")


def _init_args(module, strategy: SAA):
    cfg = module.config
    f = 2 ** (len(cfg.block_out_channels) - 1)
    sample = jnp.zeros((1, f, f, cfg.in_channels), jnp.float32)
    context = jnp.zeros((1, 1 + strategy.num_id_tokens, cfg.cross_attention_dim), jnp.float32)
    from dynamicid_jax.models.unet import dummy_added_cond

    args = (sample, jnp.zeros((1,), jnp.int32), context, saa_inputs(1, (8 * f, 8 * f)))
    return args + (dummy_added_cond(cfg),) if cfg.text_time else args


def _saa_module(unet_config, strategy: SAA | None, dtype):
    from dynamicid_jax.models.unet import UNet2DConditionModel

    strategy = strategy if strategy is not None else SAA()
    if not isinstance(strategy, SAA):
        raise TypeError(f"strategy must be an SAA instance, got {type(strategy).__name__}")
    return UNet2DConditionModel(unet_config, strategy=strategy, dtype=dtype), strategy


def abstract_saa_params(unet_config, strategy: SAA | None = None) -> dict:
    """Shapes (boxed with logical axes) of SAA's params for a UNet config, without materialising anything.
    Cached per (config, strategy); treat the returned tree as read-only."""
    return _abstract_saa_params(unet_config, strategy if strategy is not None else SAA())


@functools.lru_cache(maxsize=16)
def _abstract_saa_params(unet_config, strategy: SAA) -> dict:
    module, strategy = _saa_module(unet_config, strategy, jnp.float32)
    args = _init_args(module, strategy)
    full = jax.eval_shape(lambda r: module.init(r, *args)["params"], jax.random.key(0))
    return split_saa_params(full)[1]


def init_saa_params(unet_config, rng: jax.Array, strategy: SAA | None = None) -> dict:
    """Fresh SAA params (unboxed, fp32): LoRA down ~ N(0, 1/r), up = 0 (so the UNet is unchanged until trained),
    ``to_k_ip``/``to_v_ip`` lecun-normal (use :func:`init_ip_from_base` for the training initialisation).

    Shapes come from ``jax.eval_shape``; only SAA's leaves are drawn (one key per leaf, folded from the path), so
    neither the base UNet nor a compiled ``init`` is needed."""
    strategy = strategy if strategy is not None else SAA()
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_saa_params(unet_config, strategy)))
    out = {}
    for i, (path, leaf) in enumerate(sorted(flat.items())):
        kind = path[-2] if path[-2] in ("down", "up") else "ip"
        key = jax.random.fold_in(rng, i)
        out[path] = _initializer(kind, strategy.lora_rank)(key, leaf.shape, jnp.float32)
    return traverse_util.unflatten_dict(out)


def init_ip_from_base(params: Mapping) -> dict:
    """Copy every cross-attention's ``to_k``/``to_v`` kernels into its ``to_k_ip``/``to_v_ip`` (the official
    training initialisation). ``params`` is the merged (base + SAA) tree; returns a new tree."""
    flat = traverse_util.flatten_dict(dict(params))
    updates, missing = {}, []
    for path in flat:
        if path[-2:] == ("to_k_ip", "kernel") or path[-2:] == ("to_v_ip", "kernel"):
            src = path[:-2] + (path[-2][:-3], "kernel")  # to_k_ip → to_k
            if src not in flat:
                missing.append("/".join(src))
            elif tuple(flat[src].shape) != tuple(flat[path].shape):
                raise ValueError(f"{'/'.join(src)} {tuple(flat[src].shape)} cannot initialise "
                                 f"{'/'.join(path)} {tuple(flat[path].shape)}")
            else:
                updates[path] = jnp.asarray(flat[src])
    if missing:
        raise ValueError(f"init_ip_from_base needs the base UNet params merged in; missing {missing[:5]}")
    if not updates:
        raise ValueError("init_ip_from_base: no to_k_ip / to_v_ip params found (are the SAA params merged in?)")
    flat.update(updates)
    return traverse_util.unflatten_dict(flat)
