"""Saving images atomically (temp file + rename) and tiling them into grids."""
from __future__ import annotations

import os

import numpy as np

from dynamicid_jax.io_atomic import atomic_path


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``uint8 [N, H, W, 3]`` into one image, ``columns`` per row (default: all in one row)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got {images.shape}")
    n, h, w, _ = images.shape
    cols = columns or n
    rows = -(-n // cols)
    grid = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = img
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike, *, durable: bool = True) -> str:
    """Write ``uint8 [H, W, 3]`` to ``path`` as PNG without ever leaving a half-written file (``durable``: see
    :func:`dynamicid_jax.io_atomic.atomic_path`)."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    path = os.fspath(path)
    with atomic_path(path, suffix=".png", durable=durable) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path
