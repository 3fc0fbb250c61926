"""Identity comparison in each backend's own metric.

A face network's descriptors are trained for one comparison, and only that one has a meaningful "same person"
threshold:

* **insightface** (ArcFace) and **synthetic** (SynthFace's ArcFace-style recogniser): the cosine of the
  L2-normalised embeddings (higher = more similar). insightface publishes no single threshold; SynthFace none.
* **dlib** (``dlib_face_recognition_resnet_model_v1``): the **Euclidean distance of the raw 128-d
  descriptors**, "same person" below **0.6** (dlib's documented rule, trained with that margin). Raw dlib
  descriptors all lie in one narrow cone, so their cosines are high (0.8–0.9) even between strangers: a cosine of
  dlib descriptors says nothing about identity.

:func:`identity_metric` returns an analyzer's :class:`IdentityMetric` (a backend may declare its own as an
``identity_metric`` attribute; the default is the cosine). :func:`identity_similarity` and :func:`same_person`
compare two :class:`~dynamicid_jax.faces.Face` objects with it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .analyzer import Face

__all__ = ["IdentityMetric", "COSINE", "DLIB_EUCLIDEAN", "identity_metric", "identity_vector",
           "identity_similarity", "same_person"]


@dataclasses.dataclass(frozen=True)
class IdentityMetric:
    """How a backend compares identities.

    Attributes:
      kind: ``"cosine"`` (of unit embeddings; higher = more similar) or ``"euclidean"`` (of raw descriptors;
        lower = more similar).
      threshold: the backend's "same person" threshold (cosine ≥ it, or distance < it); ``None`` where the backend
        defines none.
      name: what the number is called in reports.
    """

    kind: str
    threshold: float | None = None
    name: str = "cosine"

    def __post_init__(self):
        if self.kind not in ("cosine", "euclidean"):
            raise ValueError(f"IdentityMetric.kind must be 'cosine' or 'euclidean', got {self.kind!r}")

    @property
    def higher_is_more_similar(self) -> bool:
        return self.kind == "cosine"

    def matrix(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``[len(a), len(b)]`` values of the metric between rows of identity vectors (see
        :func:`identity_vector`): cosines, or Euclidean distances."""
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
            raise ValueError(f"IdentityMetric.matrix: expected [N, D] and [M, D], got {a.shape} and {b.shape}")
        if self.kind == "cosine":
            an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
            bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
            return an @ bn.T
        return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)

    def same(self, values: np.ndarray | float) -> np.ndarray:
        """Boolean "same person" for metric values (needs a threshold)."""
        if self.threshold is None:
            raise ValueError(f"the {self.name} metric has no same-person threshold")
        v = np.asarray(values, np.float64)
        return v >= self.threshold if self.kind == "cosine" else v < self.threshold

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


COSINE = IdentityMetric("cosine", None, "cosine")
#: dlib's rule: raw-descriptor Euclidean distance < 0.6 means the same person.
DLIB_EUCLIDEAN = IdentityMetric("euclidean", 0.6, "Euclidean distance of raw dlib descriptors")


def identity_metric(analyzer: Any) -> IdentityMetric:
    """The analyzer's declared ``identity_metric``, else the cosine."""
    metric = getattr(analyzer, "identity_metric", None)
    if metric is None:
        return COSINE
    if not isinstance(metric, IdentityMetric):
        raise TypeError(f"{type(analyzer).__name__}.identity_metric must be an IdentityMetric, got "
                        f"{type(metric).__name__}")
    return metric


def identity_vector(face: Face, metric: IdentityMetric) -> np.ndarray:
    """The vector ``metric`` compares: the unit embedding for the cosine; for dlib's Euclidean metric the raw
    descriptor (``embedding × extras["descriptor_norm"]``, which the dlib backend records)."""
    if metric.kind == "cosine":
        return np.asarray(face.embedding, np.float64)
    norm = face.extras.get("descriptor_norm")
    if norm is None:
        raise ValueError("a Euclidean identity metric needs the raw descriptor's norm (Face.extras"
                         "['descriptor_norm'], set by the dlib backend)")
    return np.asarray(face.embedding, np.float64) * float(norm)


def identity_similarity(analyzer: Any, a: Face, b: Face) -> float:
    """The analyzer's metric between two faces (a cosine, or dlib's raw-descriptor distance)."""
    metric = identity_metric(analyzer)
    return float(metric.matrix(identity_vector(a, metric)[None], identity_vector(b, metric)[None])[0, 0])


def same_person(analyzer: Any, a: Face, b: Face) -> bool:
    """The analyzer's own "same person" decision (``ValueError`` where its metric has no threshold)."""
    metric = identity_metric(analyzer)
    return bool(metric.same(identity_similarity(analyzer, a, b)))
