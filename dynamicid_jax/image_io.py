"""Images in and out: whatever the user hands us → an RGB ``uint8 [H, W, 3]`` array (:func:`load_rgb`), and
PNGs written atomically (:func:`save_png`; temp file + rename) or tiled into grids (:func:`image_grid`).

Accepted inputs: a path (``str`` / ``os.PathLike``), a ``PIL.Image.Image``, or a numpy array ``[H, W]``,
``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` of dtype ``uint8``, ``uint16`` (16-bit, scaled down), ``bool``, or
float in ``[0, 1]``. Grayscale is replicated to three channels, alpha is dropped, palette / CMYK / 16-bit images
are converted. An unreadable or corrupt file raises ``ValueError`` naming the file.

Size limits (checked from the file header, before decoding): an image above :data:`MAX_IMAGE_PIXELS` is refused
(a 14000² PNG alone needs 590 MB decoded; PIL's own guard would raise its raw decompression-bomb error); an image
whose longer side exceeds :data:`MAX_ANALYSIS_SIDE` is downscaled (by an integer box filter) before face
analysis — a face in a reference photo is large, the detectors work at 640 px and the crops at 112–224 px, and
dlib's upsampling pyramid on a 12000² image runs out of memory.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dynamicid_jax.io_atomic import atomic_path

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]

__all__ = ["ImageLike", "MAX_ANALYSIS_SIDE", "MAX_IMAGE_PIXELS", "load_rgb", "save_png", "image_grid"]

#: images above this many pixels are refused (100 MP: 300 MB as RGB uint8, beyond any camera's reference photo)
MAX_IMAGE_PIXELS = 100_000_000
#: longer sides above this are downscaled before face analysis
MAX_ANALYSIS_SIDE = 4096

log = logging.getLogger(__name__)


def _check_pixels(width: int, height: int, what: str) -> None:
    from dynamicid_jax.errors import ResourceLimitError

    if width * height > MAX_IMAGE_PIXELS:
        raise ResourceLimitError(f"{what} is {width}×{height} = {width * height / 1e6:.0f} megapixels: at most "
                                 f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels are accepted; downscale it first")


def _shrink(img: Image.Image, what: str) -> Image.Image:
    side = max(img.width, img.height)
    if side <= MAX_ANALYSIS_SIDE:
        return img
    factor = math.ceil(side / MAX_ANALYSIS_SIDE)
    small = img.reduce(factor)
    log.warning("%s is %d×%d: downscaled %d× to %d×%d for face analysis (longer side at most %d)", what, img.width,
                img.height, factor, small.width, small.height, MAX_ANALYSIS_SIDE)
    return small


def _open_file(path: str | os.PathLike) -> Image.Image:
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"image file {name!r} does not exist")
    if os.path.isdir(name):
        raise ValueError(f"image path {name!r} is a directory, expected an image file")
    from dynamicid_jax.errors import ResourceLimitError
    from dynamicid_jax.io_atomic import check_readable

    check_readable(name, "image file")
    try:
        with warnings.catch_warnings(), Image.open(name) as img:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
            _check_pixels(img.width, img.height, f"image file {name!r}")  # from the header, before decoding
            img.load()  # decode now: truncated / corrupt data fails here, not later
            img = ImageOps.exif_transpose(img)
            return _shrink(img, f"image file {name!r}").copy()
    except ResourceLimitError:
        raise
    except Image.DecompressionBombError as err:
        raise ResourceLimitError(f"image file {name!r} is too large ({str(err).rstrip('.')}): at most "
                                 f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels are accepted; downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image file {name!r}: not a valid or complete image ({err})") from err


def _from_pil(img: Image.Image, what: str) -> np.ndarray:
    if img.width == 0 or img.height == 0:
        raise ValueError(f"{what}: empty image ({img.width}x{img.height})")
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit / 32-bit grayscale: PIL's own convert("RGB") clips at 255, so scale it ourselves.
        return _from_array(np.asarray(img), what)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _from_array(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"{what}: expected an image array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
                         f"got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what}: empty image of shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        out = (arr.astype(np.uint32) * 255 + 32767) // 65535  # full 16-bit range → 8 bit, rounded
    elif np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"{what}: integer image values must lie in [0, 65535], got [{lo}, {hi}]")
        scale = 65535 if hi > 255 else 255  # 16-bit data stored in a wider integer type (PIL mode "I")
        out = (arr.astype(np.int64) * 255 + scale // 2) // scale
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what}: float image contains NaN or inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{what}: float images must lie in [0, 1], got [{lo:.3g}, {hi:.3g}] "
                             "(for a [-1, 1] image pass (x + 1) / 2; for [0, 255] pass x.astype(np.uint8))")
        out = np.round(arr * 255.0)
    else:
        raise ValueError(f"{what}: unsupported image dtype {arr.dtype}")
    out = out.astype(np.uint8)
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    elif out.shape[2] == 4:
        out = out[:, :, :3]
    return np.ascontiguousarray(out)


def load_rgb(image: ImageLike, what: str = "image") -> np.ndarray:
    """Return ``image`` as a C-contiguous RGB ``uint8`` array ``[H, W, 3]`` (see the module docstring)."""
    if isinstance(image, (str, os.PathLike)):
        return _from_pil(_open_file(image), f"{what} {os.fspath(image)!r}")
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, what)
        return _from_pil(_shrink(image, what), what)
    if hasattr(image, "__array__") and not isinstance(image, np.ndarray):  # jax arrays, torch CPU tensors, ...
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        if image.ndim >= 2:
            _check_pixels(int(image.shape[1]), int(image.shape[0]), what)
        out = _from_array(image, what)
        if max(out.shape[:2]) > MAX_ANALYSIS_SIDE:
            out = np.asarray(_shrink(Image.fromarray(out), what))
        return out
    raise TypeError(f"{what}: expected a file path, a PIL image or a numpy array, got {type(image).__name__}")


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
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    path = os.fspath(path)
    with atomic_path(path, suffix=".png", durable=durable) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path
