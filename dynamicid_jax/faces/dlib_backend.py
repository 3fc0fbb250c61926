"""dlib backend: HOG detector, 68-point landmarks, 128-d ResNet face descriptor — real weights, fully offline.

Weights come from the ``face-recognition-models`` wheel (``shape_predictor_68_face_landmarks.dat``,
``shape_predictor_5_face_landmarks.dat``, ``dlib_face_recognition_resnet_model_v1.dat``); ``dlib`` itself from
``dlib-bin``. Both are in the ``[faces]`` extra.

* Detection: ``dlib.get_frontal_face_detector().run(image, upsample, threshold)``; ``upsample`` (default 1, as in
  dlib's own examples) doubles the image that many times so smaller faces are found (each step ~4× slower).
  ``det_score`` is the HOG SVM margin (not a probability; > 0 = accepted at the default threshold).
* ``landmarks``: the 68 iBUG points; ``kps``: eye centres, nose tip (30), mouth corners (48, 54) derived from
  them, in insightface's order.
* ``embedding``: dlib's 128-d descriptor computed on the 5-point-aligned chip (the alignment the network was
  trained with), L2-normalised; the raw norm is kept in ``Face.extras["descriptor_norm"]``. Identities are
  compared with dlib's own rule — Euclidean distance of the *raw* descriptors, same person below 0.6 — declared
  as ``DlibAnalyzer.identity_metric`` (:mod:`dynamicid_jax.faces.identity`); cosines of dlib descriptors are
  0.8–0.9 even between different people and must not be read as identity similarity.
* ``pose``: :func:`dynamicid_jax.faces.pose.estimate_pose` on the 68 landmarks.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import numpy as np

from .analyzer import Face, missing_extra_error
from .identity import DLIB_EUCLIDEAN
from dynamicid_jax.file_io import ImageLike, load_rgb
from .pose import estimate_pose, kps_from_68

__all__ = ["DlibAnalyzer", "default_model_dir"]

_FILES = {
    "landmarks_68": "shape_predictor_68_face_landmarks.dat",
    "landmarks_5": "shape_predictor_5_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
}


def default_model_dir() -> str:
    """The ``models/`` folder of the installed ``face_recognition_models`` package (found without importing it:
    its ``__init__`` needs ``pkg_resources``, which recent setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise missing_extra_error("dlib", "face_recognition_models",
                                  ImportError("No module named 'face_recognition_models'"))
    return os.path.join(list(spec.submodule_search_locations)[0], "models")


@functools.lru_cache(maxsize=4)
def _load_networks(model_dir: str):
    """Load the three networks of ``model_dir`` once per process (the 68-point model alone is ~100 MB)."""
    import dlib

    paths = {k: os.path.join(model_dir, f) for k, f in _FILES.items()}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"dlib model files not found: {', '.join(missing)} (they ship in the "
                                "face-recognition-models wheel: pip install 'dynamicid-jax[faces]')")
    return (dlib.shape_predictor(paths["landmarks_68"]), dlib.shape_predictor(paths["landmarks_5"]),
            dlib.face_recognition_model_v1(paths["recognition"]))


class DlibAnalyzer:
    """Face analysis with dlib (see the module docstring).

    Args:
      upsample: HOG detector upsampling steps (0 = image as is).
      det_threshold: detector score threshold (dlib's ``adjust_threshold``; 0 = dlib's default).
      num_jitters: descriptor jitter passes (0 = one plain pass; dlib's default).
      padding: descriptor chip padding (dlib's default 0.25).
      detect_max_side: if set, detection runs on a copy downscaled so its longer side is at most this many
        pixels (boxes are mapped back; landmarks and descriptors use the full image) — for large photos.
      model_dir: folder holding the three ``.dat`` files (default: the ``face_recognition_models`` wheel).
        Analyzers with the same folder share the loaded networks; like one analyzer, they are not meant to be
        called from several threads at once.
    """

    name = "dlib"
    embedding_dim = 128
    num_landmarks = 68
    #: compare identities by the raw descriptors' Euclidean distance, same person below 0.6 (dlib's rule; cosines
    #: of dlib descriptors are high between strangers); see :mod:`dynamicid_jax.faces.identity`
    identity_metric = DLIB_EUCLIDEAN

    def __init__(self, upsample: int = 1, det_threshold: float = 0.0, num_jitters: int = 0, padding: float = 0.25,
                 detect_max_side: int | None = None, model_dir: str | os.PathLike | None = None):
        try:
            import dlib
        except ImportError as err:
            raise missing_extra_error("dlib", "dlib", err) from err
        if int(upsample) != upsample or upsample < 0:
            raise ValueError(f"upsample must be a non-negative integer, got {upsample!r}")
        if int(num_jitters) != num_jitters or num_jitters < 0:
            raise ValueError(f"num_jitters must be a non-negative integer, got {num_jitters!r}")
        if detect_max_side is not None and detect_max_side < 32:
            raise ValueError(f"detect_max_side must be >= 32 pixels or None, got {detect_max_side!r}")
        model_dir = os.path.abspath(os.fspath(model_dir) if model_dir is not None else default_model_dir())
        self._landmarks_68, self._landmarks_5, self._recognizer = _load_networks(model_dir)
        self._dlib = dlib
        self.upsample = int(upsample)
        self.det_threshold = float(det_threshold)
        self.num_jitters = int(num_jitters)
        self.padding = float(padding)
        self.detect_max_side = detect_max_side
        self.model_dir = model_dir
        self._detector = dlib.get_frontal_face_detector()

    def __repr__(self) -> str:
        return (f"DlibAnalyzer(upsample={self.upsample}, det_threshold={self.det_threshold}, "
                f"num_jitters={self.num_jitters}, detect_max_side={self.detect_max_side})")

    def _detect(self, rgb: np.ndarray) -> list[tuple[Any, float]]:
        dlib = self._dlib
        h, w = rgb.shape[:2]
        scale = 1.0
        det_img = rgb
        if self.detect_max_side is not None and max(h, w) > self.detect_max_side:
            from PIL import Image

            scale = self.detect_max_side / max(h, w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            det_img = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
        rects, scores, _ = self._detector.run(det_img, self.upsample, self.det_threshold)
        out = []
        for rect, score in zip(rects, scores, strict=True):
            if scale != 1.0:  # dlib rectangles are inclusive: map the pixel edges, not the last pixels
                rect = dlib.rectangle(int(round(rect.left() / scale)), int(round(rect.top() / scale)),
                                      int(round((rect.right() + 1) / scale)) - 1,
                                      int(round((rect.bottom() + 1) / scale)) - 1)
            out.append((rect, float(score)))
        return sorted(out, key=lambda item: -item[1])

    def analyze(self, image: ImageLike) -> list[Face]:
        """All faces found in ``image`` (RGB array, path or PIL image), in detector order (best score first)."""
        rgb = load_rgb(image)
        faces = []
        for rect, score in self._detect(rgb):
            shape68 = self._landmarks_68(rgb, rect)
            landmarks = np.array([[p.x, p.y] for p in shape68.parts()], dtype=np.float32)
            shape5 = self._landmarks_5(rgb, rect)
            descriptor = np.asarray(
                self._recognizer.compute_face_descriptor(rgb, shape5, self.num_jitters, self.padding),
                dtype=np.float32)
            norm = float(np.linalg.norm(descriptor))
            if not np.isfinite(norm) or norm == 0.0:
                continue  # cannot happen with dlib's ResNet; skip rather than emit a bogus identity
            faces.append(Face(
                bbox=np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], dtype=np.float32),
                kps=kps_from_68(landmarks).astype(np.float32),
                landmarks=landmarks,
                embedding=descriptor / norm,
                pose=estimate_pose(landmarks),
                det_score=score,
                extras={"descriptor_norm": norm},
            ))
        return faces
