"""The face-analysis contract: :class:`Face`, the :class:`FaceAnalyzer` protocol, errors, and the backend registry.

A backend is any object with ``analyze(image) -> list[Face]``, ``embedding_dim`` and ``num_landmarks``. Backends
register a factory under a name (``register_backend``); ``get_analyzer(name, **kwargs)`` builds one. The built-in
``dlib`` and ``insightface`` factories import their (optional, ``[faces]`` extra) packages only when called. Other
packages add theirs as plug-ins (:mod:`dynamicid_jax.plugins`: an entry point, or ``$DYNAMICID_JAX_PLUGINS``), loaded
the first time a name is not found — the SynthFace demo world registers ``synthetic`` that way.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from ..plugins import load_plugins
from dynamicid_jax.image_io import ImageLike

__all__ = [
    "Face", "FaceAnalyzer", "FaceAnalysisError", "NoFaceError", "MultipleFacesError", "MultipleFacesWarning",
    "register_backend", "get_analyzer", "available_backends", "reference_face", "select_reference", "largest_face",
    "missing_extra_error",
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
