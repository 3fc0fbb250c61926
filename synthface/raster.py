"""A small vectorised 2D rasteriser: filled polygons and thick polylines, anti-aliased.

Pixel centres sit at integer coordinates (pixel ``[r, c]`` covers ``x ∈ [c − ½, c + ½]``), the convention of
detector outputs and of ``dynamicid_jax.faces.align_face``.

* Polygons (even–odd rule) are filled on a ``SUPERSAMPLE``² sub-pixel grid by scanline parity: for every
  sub-row the edge crossings are counted into a histogram whose running sum is the crossing count left of each
  sub-pixel; coverage is the mean over each pixel's sub-pixels. Cost ``O(rows · (columns + edges))``.
* Polylines of thickness ``w`` use the distance to their segments (``[pixels, segments]`` arrays), coverage
  ``clip(½ − (d − w/2), 0, 1)``.

Every primitive is evaluated only inside its bounding window, as whole numpy arrays — no per-pixel Python loops.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SUPERSAMPLE", "polygon_coverage", "polyline_distance", "offset_polygon", "Canvas", "Window"]

SUPERSAMPLE = 4


class Window:
    """A rectangle of canvas pixels: slices plus the pixel-centre coordinates ``X, Y`` ``[h, w]``."""

    def __init__(self, y0: int, y1: int, x0: int, x1: int):
        self.y0, self.y1, self.x0, self.x1 = y0, y1, x0, x1
        self.sl = (slice(y0, y1), slice(x0, x1))
        self._grid: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def X(self) -> np.ndarray:
        return self._coords()[1]

    @property
    def Y(self) -> np.ndarray:
        return self._coords()[0]

    def _coords(self) -> tuple[np.ndarray, np.ndarray]:
        if self._grid is None:
            ys = np.arange(self.y0, self.y1, dtype=np.float64)
            xs = np.arange(self.x0, self.x1, dtype=np.float64)
            self._grid = (np.broadcast_to(ys[:, None], self.shape), np.broadcast_to(xs[None, :], self.shape))
        return self._grid

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


def polygon_coverage(win: Window, verts: np.ndarray, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel of ``win`` inside the polygon ``verts`` ``[n, 2]`` (even–odd rule) → ``[h, w]``."""
    h, w = win.shape
    a = np.asarray(verts, np.float64)
    b = np.roll(a, -1, axis=0)
    rows, cols = h * ss, w * ss
    ys = win.y0 - 0.5 + (np.arange(rows) + 0.5) / ss  # sub-row centres
    ay, by = a[None, :, 1], b[None, :, 1]
    crosses = (ay > ys[:, None]) != (by > ys[:, None])  # [rows, edges]
    denom = np.where(by == ay, 1.0, by - ay)
    xc = a[None, :, 0] + (b[None, :, 0] - a[None, :, 0]) * (ys[:, None] - ay) / denom
    # index of the first sub-pixel whose centre lies right of the crossing (cols = none)
    first = np.clip(np.floor((xc - win.x0 + 0.5) * ss - 0.5).astype(np.int64) + 1, 0, cols)
    r_idx = np.broadcast_to(np.arange(rows)[:, None], crosses.shape)
    hist = np.bincount((r_idx * (cols + 1) + first)[crosses], minlength=rows * (cols + 1))
    inside = (np.cumsum(hist.reshape(rows, cols + 1)[:, :cols], axis=1) & 1).astype(np.float64)
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))


def polyline_distance(x: np.ndarray, y: np.ndarray, pts: np.ndarray, closed: bool = False) -> np.ndarray:
    """Unsigned distance from points ``x, y`` (equal shapes) to a polyline (closed: plus last → first)."""
    shape = np.shape(x)
    a = np.asarray(pts, np.float64)
    if len(a) == 1:
        a = np.concatenate([a, a], 0)
    b = np.roll(a, -1, axis=0) if closed else a[1:]
    if not closed:
        a = a[:-1]
    px, py = np.ravel(x)[:, None], np.ravel(y)[:, None]
    ex, ey = (b - a)[:, 0], (b - a)[:, 1]
    wx, wy = px - a[:, 0], py - a[:, 1]
    t = np.clip((wx * ex + wy * ey) / np.maximum(ex * ex + ey * ey, 1e-12), 0.0, 1.0)
    d2 = (wx - ex * t) ** 2 + (wy - ey * t) ** 2
    return np.sqrt(d2.min(1)).reshape(shape)


def offset_polygon(verts: np.ndarray, distance: np.ndarray | float) -> np.ndarray:
    """Move each vertex of a closed, convex-ish polygon ``distance`` pixels outwards along its vertex normal."""
    v = np.asarray(verts, np.float64)
    prev, nxt = np.roll(v, 1, axis=0), np.roll(v, -1, axis=0)
    tangent = nxt - prev
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], -1)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    centroid = v.mean(0)
    flip = np.sign(((v - centroid) * normal).sum(1, keepdims=True))
    flip[flip == 0] = 1.0
    return v + normal * flip * np.asarray(distance, np.float64).reshape(-1, 1)


class Canvas:
    """An RGB float image ``[H, W, 3]`` in ``[0, 1]`` painted shape by shape (painter's algorithm)."""

    def __init__(self, height: int, width: int, fill=(0.0, 0.0, 0.0)):
        self.rgb = np.empty((height, width, 3), np.float64)
        self.rgb[...] = np.asarray(fill, np.float64)
        self.height, self.width = height, width

    def window(self, pts: np.ndarray, pad: float = 1.5) -> Window | None:
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        x0 = max(int(np.floor(pts[:, 0].min() - pad)), 0)
        y0 = max(int(np.floor(pts[:, 1].min() - pad)), 0)
        x1 = min(int(np.ceil(pts[:, 0].max() + pad)) + 1, self.width)
        y1 = min(int(np.ceil(pts[:, 1].max() + pad)) + 1, self.height)
        if x1 <= x0 or y1 <= y0:
            return None
        return Window(y0, y1, x0, x1)

    def blend(self, win: Window, alpha: np.ndarray, colour) -> None:
        """``out = (1 − α)·out + α·colour`` in ``win``; ``colour`` is ``[3]`` or ``[h, w, 3]``."""
        region = self.rgb[win.sl]
        a = np.asarray(alpha, np.float64)[..., None]
        region += a * (np.asarray(colour, np.float64) - region)

    def mask(self, verts: np.ndarray) -> np.ndarray:
        """A polygon's coverage as a full-canvas ``[H, W]`` array (to clip later shapes with)."""
        out = np.zeros((self.height, self.width), np.float64)
        win = self.window(verts, 1.0)
        if win is not None:
            out[win.sl] = polygon_coverage(win, verts)
        return out

    def polygon(self, verts: np.ndarray, colour, alpha: float = 1.0, clip: np.ndarray | None = None) -> None:
        """Fill a polygon; ``clip``: a full-canvas coverage mask multiplied in."""
        win = self.window(verts, 1.0)
        if win is None:
            return
        a = polygon_coverage(win, verts) * alpha
        self.blend(win, a if clip is None else a * clip[win.sl], colour)

    def stroke(self, pts: np.ndarray, width: float, colour, alpha: float = 1.0, closed: bool = False,
               clip: np.ndarray | None = None) -> None:
        """Draw a polyline of total thickness ``width`` pixels (round caps and joins)."""
        win = self.window(pts, 1.5 + width / 2)
        if win is None:
            return
        a = np.clip(0.5 - (polyline_distance(win.X, win.Y, pts, closed) - width / 2), 0.0, 1.0) * alpha
        self.blend(win, a if clip is None else a * clip[win.sl], colour)

    def to_uint8(self) -> np.ndarray:
        return np.clip(np.round(self.rgb * 255.0), 0, 255).astype(np.uint8)
