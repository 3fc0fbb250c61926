"""Files in and out: the one way this project writes files, and images read from whatever the user hands us.

**Writing**: atomically, with the modes a normal tool would give them. Every output goes to a temporary name in the
destination's folder, is flushed to disk (``fsync``) and then renamed over the destination (``os.replace``, atomic
on POSIX): a reader sees the old file or the new one, never half of one, and an interrupted or failed write leaves
nothing at the destination. ``tempfile`` creates its files 0600 and its folders 0700; before the rename the mode is
set to what ``open()`` / ``mkdir`` would have given under the current umask (``0o666 & ~umask`` for files, ``0o777 &
~umask`` for folders), so colleagues sharing a data folder can read what we wrote.

    with atomic_path("out.png") as tmp:       # any writer that takes a path
        image.save(tmp, format="PNG")
    write_json({"a": 1}, "summary.json")      # or write_bytes / write_text
    with atomic_folder("converted") as tmp:   # a whole folder appears complete or not at all
        ...

:func:`check_writable` checks an output location before long work starts (issue: outputs checked only after
minutes of sampling).

**Images**: whatever the user hands us → an RGB ``uint8 [H, W, 3]`` array (:func:`load_rgb`), and PNGs written
atomically (:func:`save_png`) or tiled into grids (:func:`image_grid`).

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

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from typing import Any, Callable, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageLike", "MAX_ANALYSIS_SIDE", "MAX_IMAGE_PIXELS", "atomic_folder", "atomic_path", "check_writable",
           "current_umask", "dir_mode", "file_mode", "fix_tree_modes", "image_grid", "load_rgb", "save_png",
           "write_bytes", "write_json", "write_text"]


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux; elsewhere the classic
    set-and-restore, which is not thread-safe but only runs where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: ``0o777 & ~umask``."""
    return 0o777 & ~current_umask()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    try:
        _fsync_path(folder)
    except OSError:  # some file systems do not allow fsync on folders; the rename is still atomic
        pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None, make_parents: bool = True,
                durable: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on a clean exit it is fsynced, given :func:`file_mode` and renamed
    over ``path``; on any exception (Ctrl-C included) it is removed and ``path`` is untouched. ``durable=False``
    skips the fsyncs (the rename stays atomic for readers; only a power loss can lose the file): for data sets of
    many small files that a rerun regenerates, where an fsync per file costs ~10 ms each (SynthFace's 8,000 files:
    19 s → 100 s)."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if make_parents:
        os.makedirs(folder, exist_ok=True)
    if suffix is None:
        suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        if durable:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if durable:
        _fsync_dir(folder)


def write_bytes(data: bytes, path: str | os.PathLike, *, durable: bool = True) -> str:
    """Write ``data`` to ``path`` atomically; returns ``path`` (``durable``: see :func:`atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return os.fspath(path)


def write_text(text: str, path: str | os.PathLike, encoding: str = "utf-8", *, durable: bool = True) -> str:
    return write_bytes(text.encode(encoding), path, durable=durable)


def write_json(obj: Any, path: str | os.PathLike, *, indent: int | None = 1, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> str:
    """``json.dump`` to ``path`` atomically (``default`` as in :func:`json.dump`, e.g. ``float`` for NumPy
    scalars). The JSON is serialised before anything is written, so an unserialisable object leaves no file."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)
    return write_text(text, path)


def fix_tree_modes(folder: str) -> None:
    """Give ``folder`` and every folder / file under it the umask's modes (files keep their execute bits off)."""
    dmode, fmode = dir_mode(), file_mode()
    os.chmod(folder, dmode)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, fmode)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on a clean exit every mode under it follows the umask, it is
    fsynced and renamed to ``path``. ``path`` must not exist, unless ``replace=True``: then the old folder is moved
    aside only after the new one is complete, and removed after the rename (the caller decides whether the old
    folder may be replaced — see e.g. the converted-folder marker). On an exception the temporary folder is
    removed and ``path`` is untouched."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and not replace:
        raise FileExistsError(f"{path} already exists")
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        yield tmp
        fix_tree_modes(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync_path(os.path.join(root, name))
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(path) + "-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)


def check_writable(path: str | os.PathLike, what: str = "output", *, folder: bool = False) -> str:
    """Check, before any long work, that ``path`` can be written: it is not an existing folder (for a file
    output) or file (for a folder output), and its nearest existing ancestor is a writable folder (no part of the
    path is a file). Creates nothing; returns the absolute path. Raises ``OutputPathError`` naming ``what``."""
    from dynamicid_jax.errors import OutputPathError

    p = os.path.abspath(os.fspath(path))
    if folder:
        if os.path.exists(p) and not os.path.isdir(p):
            raise OutputPathError(f"{what} {os.fspath(path)!r} is an existing file; expected a folder path")
    elif os.path.isdir(p):
        raise OutputPathError(f"{what} {os.fspath(path)!r} is a folder; expected a file path such as "
                              f"{os.path.join(os.fspath(path), 'out.png')!r}")
    ancestor = os.path.dirname(p) if not os.path.isdir(p) else p
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputPathError(f"{what} {os.fspath(path)!r} lies under {ancestor!r}, which is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {os.fspath(path)!r}: the folder {ancestor!r} is not writable")
    return p


def check_readable(path: str | os.PathLike, what: str = "input") -> None:
    """Raise a ``PermissionError`` naming ``what`` when ``path`` (or a folder above it) exists but this user may
    not read it — so an unreadable folder is reported as unreadable, not as "missing" or "malformed"."""
    p = os.path.abspath(os.fspath(path))
    probe = p
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
    if probe != p:  # the path is hidden: a folder above it cannot be searched, or it does not exist
        if os.path.isdir(probe) and not os.access(probe, os.R_OK | os.X_OK):
            raise PermissionError(13, f"{what} {os.fspath(path)!r} is unreadable: this user may not open the folder "
                                      f"{probe!r}")
        return
    need = os.R_OK | os.X_OK if os.path.isdir(p) else os.R_OK
    if not os.access(p, need):
        raise PermissionError(13, f"{what} {os.fspath(path)!r} is unreadable for this user (mode "
                                  f"{oct(os.stat(p).st_mode & 0o777)})")


# ---------------------------------------------------------------------------------------------------------
# Images in and out
# ---------------------------------------------------------------------------------------------------------
ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


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
    :func:`atomic_path`)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    path = os.fspath(path)
    with atomic_path(path, suffix=".png", durable=durable) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path
