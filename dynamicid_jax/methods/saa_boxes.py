"""Where identities go in an SAA image: the layout boxes and the attention grids they are mapped onto
(docs/method.md §4.4).

Boxes are normalised ``[y_min, x_min, y_max, x_max]``; :func:`validate_boxes` checks user boxes and picks routing
(one box per identity) or mixing (one box for several), :func:`layout_boxes` gives the default boxes without user
boxes. Each attention layer sees the image as a grid of query tokens (:func:`layer_grid`, :func:`query_grids`);
:func:`box_edges` turns boxes into cell ranges on a grid and :func:`box_masks` into per-token masks. The SAA
strategy (:mod:`dynamicid_jax.methods.saa`, which re-exports these names) composes them.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["layout_boxes", "validate_boxes", "layer_grid", "query_grids", "box_edges", "box_masks"]


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
