"""The face-analysis contract: :class:`Face`, the :class:`FaceAnalyzer` protocol, errors, the backend registry and the
reference choice; and the face geometry that needs no backend (numpy / PIL only): ArcFace alignment, the IMR
landmark raster, the automatic face prompt.

A backend is any object with ``analyze(image) -> list[Face]``, ``embedding_dim`` and ``num_landmarks``. Backends
register a factory under a name (``register_backend``); ``get_analyzer(name, **kwargs)`` builds one. The built-in
``dlib`` and ``insightface`` factories import their (optional, ``[faces]`` extra) packages only when called. Other
packages add theirs as plug-ins (:mod:`dynamicid_jax.plugins`: an entry point, or ``$DYNAMICID_JAX_PLUGINS``), loaded
the first time a name is not found — the SynthFace demo world registers ``synthetic`` that way.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from ..plugins import load_plugins
from dynamicid_jax.file_io import ImageLike, load_rgb

__all__ = [
    "Face", "FaceAnalyzer", "FaceAnalysisError", "NoFaceError", "MultipleFacesError", "MultipleFacesWarning",
    "register_backend", "get_analyzer", "available_backends", "reference_face", "select_reference", "largest_face",
    "missing_extra_error",
    "ARCFACE_TEMPLATE", "similarity_transform", "arcface_transform", "align_face",
    "RASTER_SIZE", "RASTER_ANALYSIS_SIZE", "raster_from_landmarks", "landmark_raster", "raster_from_image",
    "raster_to_image", "EXPRESSIONS", "auto_face_prompt",
]


class FaceAnalysisError(ValueError):
    """Base class of the errors raised for images that do not fit a face-analysis request."""


class NoFaceError(FaceAnalysisError):
    """No face was found where one was required (e.g. in a reference image)."""


class MultipleFacesError(FaceAnalysisError):
    """More than one face in an image that must show exactly one identity (``strict=True``)."""


class MultipleFacesWarning(UserWarning):
    """More than one face in a single-identity reference; the largest one was used."""


def _as_points(value: Any, n: int | None, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != 2 or (n is not None and arr.shape[0] != n):
        want = f"[{n}, 2]" if n is not None else "[N, 2]"
        raise ValueError(f"Face.{name}: expected shape {want}, got {tuple(arr.shape)}")
    return arr


@dataclasses.dataclass(eq=False)
class Face:
    """One detected face, all coordinates in pixels of the analysed image.

    Attributes:
      bbox: ``[x0, y0, x1, y1]`` float32.
      kps: ``[5, 2]`` (x, y) in insightface's order: left eye, right eye, nose tip, left mouth corner, right
        mouth corner ("left" = the image's left).
      landmarks: ``[N, 2]`` dense landmarks (106 for insightface, 68 for dlib).
      embedding: ``[D]`` float32 identity vector, L2-normalised.
      pose: ``[3]`` float32 (pitch, yaw, roll) in degrees. pitch > 0: facing up; yaw > 0: facing the image's
        right; roll > 0: the face is rotated clockwise in the image. This is insightface's convention.
      det_score: the detector's confidence (a probability for insightface, the HOG SVM margin for dlib).
      extras: backend-specific additions (e.g. insightface's ``gender`` / ``age`` / ``landmark_3d_68``).
    """

    bbox: np.ndarray
    kps: np.ndarray
    landmarks: np.ndarray
    embedding: np.ndarray
    pose: np.ndarray
    det_score: float
    extras: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.bbox = np.asarray(self.bbox, dtype=np.float32).reshape(-1)
        if self.bbox.shape != (4,):
            raise ValueError(f"Face.bbox: expected 4 values [x0, y0, x1, y1], got shape {self.bbox.shape}")
        self.kps = _as_points(self.kps, 5, "kps")
        self.landmarks = _as_points(self.landmarks, None, "landmarks")
        emb = np.asarray(self.embedding, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(emb))
        if emb.size == 0 or not np.isfinite(norm) or abs(norm - 1.0) > 1e-3:
            raise ValueError(f"Face.embedding: expected a finite L2-normalised vector, got norm {norm:.4g}")
        self.embedding = emb
        self.pose = np.asarray(self.pose, dtype=np.float32).reshape(-1)
        if self.pose.shape != (3,):
            raise ValueError(f"Face.pose: expected (pitch, yaw, roll), got shape {self.pose.shape}")
        self.det_score = float(self.det_score)

    @property
    def area(self) -> float:
        """Box area in square pixels (0 for degenerate boxes)."""
        x0, y0, x1, y1 = (float(v) for v in self.bbox)
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)

    @property
    def pitch(self) -> float:
        return float(self.pose[0])

    @property
    def yaw(self) -> float:
        return float(self.pose[1])

    @property
    def roll(self) -> float:
        return float(self.pose[2])


@runtime_checkable
class FaceAnalyzer(Protocol):
    """What every backend provides. ``image``: RGB ``uint8`` ``[H, W, 3]``, a path, or a PIL image."""

    embedding_dim: int
    num_landmarks: int

    def analyze(self, image: ImageLike) -> list[Face]:
        ...


# ----------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., FaceAnalyzer]] = {}
#: each backend's keyword for the folder of its model files (``get_analyzer(name, root=…)``); None: it has none
_ROOT_KEYWORDS: dict[str, str | None] = {}


def register_backend(name: str, factory: Callable[..., FaceAnalyzer], *, root_keyword: str | None = "root",
                     overwrite: bool = False) -> None:
    """Make ``get_analyzer(name, **kwargs)`` call ``factory(**kwargs)``. ``root_keyword`` is the factory's keyword
    for the folder of the backend's model files, which ``get_analyzer(name, root=DIR)`` (and every command's
    ``--analyzer-root``) fills in; None for a backend without one."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"backend {name!r}: factory must be callable, got {type(factory).__name__}")
    if root_keyword is not None and (not isinstance(root_keyword, str) or not root_keyword.isidentifier()):
        raise ValueError(f"backend {name!r}: root_keyword must be a keyword name or None, got {root_keyword!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"face-analysis backend {name!r} is already registered (pass overwrite=True to replace)")
    _REGISTRY[name] = factory
    _ROOT_KEYWORDS[name] = root_keyword


def available_backends() -> list[str]:
    """Names accepted by :func:`get_analyzer` (the installed plug-ins' included), sorted."""
    load_plugins()
    return sorted(_REGISTRY)


def get_analyzer(name: str, *, root: str | os.PathLike | None = None, **kwargs: Any) -> FaceAnalyzer:
    """Build the analyzer registered as ``name`` with backend-specific keyword arguments (an unknown name loads
    the plug-ins first, :func:`dynamicid_jax.plugins.load_plugins`). ``root``: the folder of the backend's model
    files, passed under the keyword the backend registered (insightface ``root``, dlib ``model_dir``)."""
    if name not in _REGISTRY:
        load_plugins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown face-analysis backend {name!r}; registered: {', '.join(available_backends())}")
    if root is not None:
        keyword = _ROOT_KEYWORDS.get(name, "root")
        if keyword is None:
            raise ValueError(f"face-analysis backend {name!r} takes no model folder, got root={os.fspath(root)!r}")
        if keyword in kwargs:
            raise ValueError(f"face-analysis backend {name!r}: give its model folder once, as root= or {keyword}=")
        kwargs[keyword] = os.fspath(root)
    analyzer = _REGISTRY[name](**kwargs)
    if not isinstance(analyzer, FaceAnalyzer):
        raise TypeError(f"backend {name!r} returned {type(analyzer).__name__}, which lacks analyze / "
                        "embedding_dim / num_landmarks")
    return analyzer


def missing_extra_error(backend: str, package: str, err: ImportError) -> ImportError:
    """The ImportError raised when a backend's optional package is absent."""
    return ImportError(f"the {backend!r} face-analysis backend needs the {package!r} package, which is not "
                       f"installed ({err}); install the extra with: pip install 'dynamicid-jax[faces]'")


def _dlib_factory(**kwargs: Any) -> FaceAnalyzer:
    from .dlib_backend import DlibAnalyzer

    return DlibAnalyzer(**kwargs)


def _insightface_factory(**kwargs: Any) -> FaceAnalyzer:
    from .insightface_backend import InsightFaceAnalyzer

    return InsightFaceAnalyzer(**kwargs)


register_backend("dlib", _dlib_factory, root_keyword="model_dir")
register_backend("insightface", _insightface_factory)


# --------------------------------------------------------------------------------------- reference faces

def largest_face(faces: list[Face]) -> Face:
    """The face with the largest box (the first one on ties)."""
    if not faces:
        raise NoFaceError("no face to choose from")
    return max(faces, key=lambda f: f.area)


def reference_face(analyzer: FaceAnalyzer, image: ImageLike, strict: bool = False, *,
                   what: str = "reference image") -> Face:
    """The single identity shown in a reference image.

    No face → :class:`NoFaceError` (the official code silently used a zero embedding instead). More than one face
    → the largest, with a :class:`MultipleFacesWarning`; with ``strict=True`` → :class:`MultipleFacesError`.
    """
    faces = analyzer.analyze(image)
    return select_reference(faces, strict, what)


def select_reference(faces: list[Face], strict: bool = False, what: str = "reference image") -> Face:
    """:func:`reference_face`'s rule applied to faces already found (``what`` names the image in messages)."""
    if not faces:
        raise NoFaceError(f"no face found in the {what}; a reference must show one clearly visible face")
    if len(faces) > 1:
        if strict:
            raise MultipleFacesError(f"{len(faces)} faces found in the {what}, expected exactly one (strict=True)")
        face = largest_face(faces)
        warnings.warn(f"{len(faces)} faces found in the {what}; using the largest (box "
                      f"{np.round(face.bbox).astype(int).tolist()}). Pass strict=True to make this an error.",
                      MultipleFacesWarning, stacklevel=3)
        return face
    return faces[0]


# ---------------------------------------------------------------------------------------------------------
# Face geometry that needs no backend
# ---------------------------------------------------------------------------------------------------------
#: the 5-point ArcFace template for 112×112 crops (left eye, right eye, nose, left mouth, right mouth), pixels
ARCFACE_TEMPLATE = np.array([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041],
], dtype=np.float64)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) with ``dst ≈ M·[src; 1]``.

    Closed form of Umeyama (1991). Returns the ``[2, 3]`` matrix.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"similarity_transform: expected two matching [N>=2, 2] point sets, got {src.shape} "
                         f"and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = float((s_c ** 2).sum() / len(src))
    if var_s <= 1e-12:
        raise ValueError("similarity_transform: source points are coincident")
    cov = d_c.T @ s_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    fix = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        fix[1, 1] = -1.0
    rot = u @ fix @ vt
    scale = float(np.trace(np.diag(sig) @ fix)) / var_s
    trans = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, trans[:, None]])


def arcface_transform(kps: np.ndarray, size: int = 112) -> np.ndarray:
    """The ``[2, 3]`` similarity taking the 5 keypoints onto the ArcFace template of a ``size``² crop.

    ``size`` a multiple of 112 scales the template; a multiple of 128 scales it by ``size/128`` and shifts it
    right by ``8·size/128`` (the usual convention for 128-pixel crops).
    """
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2):
        raise ValueError(f"kps: expected [5, 2] keypoints, got shape {kps.shape}")
    if size % 112 == 0:
        template = ARCFACE_TEMPLATE * (size / 112.0)
    elif size % 128 == 0:
        ratio = size / 128.0
        template = ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0])
    else:
        raise ValueError(f"align size must be a multiple of 112 or 128, got {size}")
    return similarity_transform(kps, template)


def align_face(image: ImageLike, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp ``image`` so the 5 keypoints land on the ArcFace template → RGB uint8 ``[size, size, 3]``.

    Bilinear sampling, black outside the image. Pixel centres sit at integer coordinates (as for detector
    outputs), i.e. the result matches ``cv2.warpAffine`` of the same matrix.
    """
    rgb = load_rgb(image)
    m = np.vstack([arcface_transform(kps, size), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(m)
    # PIL samples at pixel centres (x + 0.5): shift the matrix so integer coordinates are centres.
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    pil_inv = shift @ inv @ np.linalg.inv(shift)
    out = Image.fromarray(rgb).transform((size, size), Image.Transform.AFFINE, data=tuple(pil_inv[:2].ravel()),
                                         resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(out, dtype=np.uint8)


# --------------------------------------------------------------------------------------------- landmark raster

RASTER_SIZE = 96
RASTER_ANALYSIS_SIZE = 512


def raster_from_landmarks(landmarks: np.ndarray, image_size: tuple[int, int] = (512, 512)) -> np.ndarray:
    """The IMR landmark raster ``[96, 96, 1]`` float32 in ``{-1, 1}`` from landmarks of an image of ``image_size``.

    ``image_size`` is ``(width, height)`` of the image the landmarks were measured on; they are first mapped to a
    512×512 frame (a no-op for the default), then divided by ``512/96`` and truncated with ``int()``; a point is
    kept only if ``0 < x < 96`` and ``0 < y < 96`` (before truncation), its pixel set to 1, and the image
    normalised as ``(v − 0.5)/0.5`` — the official recipe, so rasters match checkpoints trained on it.
    """
    pts = np.asarray(landmarks)
    if pts.ndim != 2 or pts.shape[1] < 2 or pts.shape[0] == 0:
        raise ValueError(f"landmarks: expected [N, 2] image points, got shape {pts.shape}")
    if not np.issubdtype(pts.dtype, np.floating):
        pts = pts.astype(np.float64)
    pts = pts[:, :2]
    width, height = (int(v) for v in image_size)
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive (width, height), got {image_size}")
    if (width, height) != (RASTER_ANALYSIS_SIZE, RASTER_ANALYSIS_SIZE):
        pts = pts * np.array([RASTER_ANALYSIS_SIZE / width, RASTER_ANALYSIS_SIZE / height], dtype=pts.dtype)
    pts = pts / (RASTER_ANALYSIS_SIZE / RASTER_SIZE)  # same expression (and dtype) as the official code
    raster = np.zeros((RASTER_SIZE, RASTER_SIZE), dtype=np.float32)
    for x, y in pts:
        if 0 < x < RASTER_SIZE and 0 < y < RASTER_SIZE:
            raster[int(y), int(x)] = 1.0
    return ((raster - 0.5) / 0.5)[:, :, None]


def landmark_raster(image: ImageLike, analyzer: FaceAnalyzer, strict: bool = False) -> np.ndarray:
    """The IMR landmark raster of the face in ``image`` → float32 ``[96, 96, 1]`` (NHWC without batch).

    As the official code: resize to 512×512 ignoring the aspect ratio (bicubic), analyse, rasterise the face's
    landmarks (:func:`raster_from_landmarks`). The official code used insightface's 106 points; with a 68-point
    analyzer (dlib) the raster holds those 68 points instead, which checkpoints trained on 106-point rasters
    (the released ``IMR.bin`` / ``key_point_encoder.bin``) have never seen — use the insightface backend with them.
    No face → :class:`NoFaceError`; several → the largest with a warning (``strict=True`` raises).
    """
    rgb = load_rgb(image)
    resized = np.asarray(Image.fromarray(rgb).resize((RASTER_ANALYSIS_SIZE, RASTER_ANALYSIS_SIZE),
                                                      Image.Resampling.BICUBIC))
    face = select_reference(analyzer.analyze(resized), strict, "image given for the landmark raster")
    return raster_from_landmarks(face.landmarks, (RASTER_ANALYSIS_SIZE, RASTER_ANALYSIS_SIZE))


def raster_from_image(image: ImageLike) -> np.ndarray:
    """A stored 96×96 landmark image (e.g. a target landmark PNG) → float32 ``[96, 96, 1]`` in ``[-1, 1]``.

    As the official loader: convert to grayscale, scale to ``[0, 1]``, normalise ``(v − 0.5)/0.5``.
    """
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 1 and image.dtype == np.uint8:
        gray = image[:, :, 0]
    else:
        gray = np.asarray(Image.fromarray(load_rgb(image, "landmark image")).convert("L"))
    if gray.shape != (RASTER_SIZE, RASTER_SIZE):
        raise ValueError(f"landmark image must be exactly {RASTER_SIZE}x{RASTER_SIZE}, got "
                         f"{gray.shape[1]}x{gray.shape[0]}")
    return ((gray.astype(np.float32) / 255.0 - 0.5) / 0.5)[:, :, None]


def raster_to_image(raster: np.ndarray) -> Image.Image:
    """Inverse of :func:`raster_from_image`: a ``[96, 96(, 1)]`` raster in ``[-1, 1]`` → 8-bit grayscale image."""
    arr = np.asarray(raster, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.shape != (RASTER_SIZE, RASTER_SIZE):
        raise ValueError(f"raster: expected [{RASTER_SIZE}, {RASTER_SIZE}, 1], got {np.shape(raster)}")
    return Image.fromarray(np.clip(np.round((arr * 0.5 + 0.5) * 255.0), 0, 255).astype(np.uint8), mode="L")


# ------------------------------------------------------------------------------------------ face prompts

#: the expression labels of the official emotion classifier, in its output order
EXPRESSIONS = ("happy", "surprise", "sad", "anger", "disgust", "fear", "neutral")


def auto_face_prompt(pose: Sequence[float], expression: str = "neutral") -> str:
    """The automatic source face prompt of the official pipeline, from ``(pitch, yaw[, roll])`` in degrees.

    ``"in a {expression} expression, "`` + ``"facing up, "`` if pitch > 10 / ``"facing down, "`` if pitch < −10
    + ``"in front view"`` if |yaw| < 10 else ``"in side view"``.
    """
    if expression not in EXPRESSIONS:
        raise ValueError(f"expression must be one of {', '.join(EXPRESSIONS)}; got {expression!r}")
    values = np.asarray(pose, dtype=np.float64).reshape(-1)
    if values.size not in (2, 3) or not np.all(np.isfinite(values)):
        raise ValueError(f"pose: expected finite (pitch, yaw[, roll]) in degrees, got {pose!r}")
    pitch, yaw = float(values[0]), float(values[1])
    prompt = f"in a {expression} expression, "
    if pitch > 10:
        prompt += "facing up, "
    elif pitch < -10:
        prompt += "facing down, "
    prompt += "in front view" if math.fabs(yaw) < 10 else "in side view"
    return prompt
