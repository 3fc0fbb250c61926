"""The ``synthetic`` face-analysis backend: SynthFace's stand-in for insightface.

Two paths, one :class:`~dynamicid_jax.faces.Face` contract:

* **Rendered images** (a path, or a PIL image opened from one, whose ``{stem}.json`` sidecar the SynthFace
  generator wrote): box, 5 keypoints, 68 landmarks and pose are the renderer's exact values (``det_score`` 1).
  A single-person sidecar gives one face, a scene sidecar one face per person. If the image on disk was resized
  after rendering, the coordinates are mapped to its size (exact for a plain resize).
* **Any other image** (numpy arrays, generated images): the learned :class:`SyntheticDetector` finds the faces
  (any number — multi-person layouts included) and :class:`SyntheticLandmarker` regresses landmarks and pose.

In both paths ``embedding`` is the SynthFace recogniser's (``synthface.faces.recognizer``, the world's "ArcFace") on
the face aligned by its keypoints, so training data and generated images are embedded the same way.

Models come from a folder written by ``python -m synthface.train_models`` (sub-folders
``recognizer/``, ``detector/``, ``landmarker/``) or are passed as objects / folders::

    analyzer = get_analyzer("synthetic", models_dir="synthface_models")
    faces = analyzer.analyze("synthface/train/id00000/happy_left.png")   # exact values + embedding
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from dynamicid_jax.faces.analyzer import Face
from dynamicid_jax.file_io import ImageLike, load_rgb
from .detector import SyntheticDetector, SyntheticLandmarker
from .recognizer import SyntheticRecognizer

__all__ = ["SyntheticAnalyzer", "read_sidecar", "sidecar_path", "kps_from_landmarks"]


def sidecar_path(image_path: str | os.PathLike) -> str:
    return os.path.splitext(os.fspath(image_path))[0] + ".json"


def read_sidecar(image_path: str | os.PathLike) -> dict[str, Any] | None:
    """The SynthFace sidecar of an image file, or None if there is none (or it is not a SynthFace record)."""
    path = sidecar_path(image_path)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"SynthFace sidecar {path!r} is not valid JSON ({err})") from err
    if not isinstance(record, dict) or not str(record.get("schema", "")).startswith("synthface/"):
        return None
    return record


def kps_from_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """Insightface-order keypoints from 68 landmarks: eye centres, nose tip, mouth corners (as the renderer)."""
    lmk = np.asarray(landmarks, np.float64)
    return np.stack([lmk[36:42].mean(0), lmk[42:48].mean(0), lmk[30], lmk[48], lmk[54]])


def _image_path(image: ImageLike) -> str | None:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    name = getattr(image, "filename", None)  # PIL images opened from a file
    return name if isinstance(name, str) and name else None


def _load(obj, cls, folder: str | None, sub: str):
    if obj is None:
        if folder is None:
            return None
        path = os.path.join(folder, sub)
        return cls.load(path) if os.path.isdir(path) else None
    if isinstance(obj, (str, os.PathLike)):
        return cls.load(obj)
    if not isinstance(obj, cls):
        raise TypeError(f"expected a {cls.__name__} or a folder, got {type(obj).__name__}")
    return obj


class SyntheticAnalyzer:
    """Face analysis for SynthFace images (see the module docstring).

    Args:
      models_dir: folder with ``recognizer/`` (required unless ``recognizer`` is given), ``detector/`` and
        ``landmarker/`` (needed for images without a sidecar).
      recognizer / detector / landmarker: objects or model folders overriding ``models_dir``.
      use_sidecar: read exact values from sidecars when present (False: always detect — to measure the
        detector on rendered images).
      score_threshold: detector heatmap threshold (default: the detector's own).
      native_size: the scale (px, shorter side) the learned detector was trained at (SynthFace renders: 64).
        Images more than twice as large — e.g. a reference upsampled to 512² for the IMR's landmark raster — are
        analysed at this size and the geometry is mapped back to the image; ``None`` analyses every image as is.
    """

    name = "synthetic"
    num_landmarks = 68

    def __init__(self, models_dir: str | os.PathLike | None = None, *, recognizer=None, detector=None,
                 landmarker=None, use_sidecar: bool = True, score_threshold: float | None = None,
                 native_size: int | None = 64):
        folder = None if models_dir is None else os.fspath(models_dir)
        if folder is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"SynthFace models folder {folder!r} does not exist (train one with "
                                    "python -m synthface.train_models --data DIR --out MODELS)")
        self.recognizer = _load(recognizer, SyntheticRecognizer, folder, "recognizer")
        if self.recognizer is None:
            raise ValueError("the synthetic backend needs a recogniser for embeddings: pass models_dir= (with a "
                             "recognizer/ sub-folder) or recognizer=")
        self.detector = _load(detector, SyntheticDetector, folder, "detector")
        self.landmarker = _load(landmarker, SyntheticLandmarker, folder, "landmarker")
        self.use_sidecar = bool(use_sidecar)
        self.score_threshold = score_threshold
        if native_size is not None and (isinstance(native_size, bool) or not isinstance(native_size, int)
                                        or native_size < 16):
            raise ValueError(f"native_size must be an integer >= 16 or None, got {native_size!r}")
        self.native_size = native_size

    @property
    def embedding_dim(self) -> int:
        return self.recognizer.embedding_dim

    def __repr__(self) -> str:
        return (f"SyntheticAnalyzer(embedding_dim={self.embedding_dim}, detector={self.detector is not None}, "
                f"landmarker={self.landmarker is not None}, use_sidecar={self.use_sidecar})")

    def analyze(self, image: ImageLike) -> list[Face]:
        """All faces in ``image``: exact ones from a sidecar when there is one, else detected ones."""
        path = _image_path(image)
        rgb = load_rgb(image)
        if self.use_sidecar and path is not None:
            record = read_sidecar(path)
            if record is not None:
                return self.faces_from_record(record, rgb)
        return self.detect(rgb)

    def faces_from_record(self, record: dict[str, Any], rgb: np.ndarray) -> list[Face]:
        """Faces with a sidecar's exact values (mapped to ``rgb``'s size if it differs) and recogniser embeddings."""
        entries = record["faces"] if "faces" in record else [record]
        if not entries:
            return []
        h0, w0 = record.get("size", rgb.shape[:2])
        h, w = rgb.shape[:2]
        scale = np.array([w / w0, h / h0])

        def fit(points):
            return (np.asarray(points, np.float64) + 0.5) * scale - 0.5

        kps = np.stack([fit(e["kps"]) for e in entries])
        emb = self.recognizer.embed([rgb] * len(entries), kps)
        faces = []
        for e, k, v in zip(entries, kps, emb):
            box = fit(np.asarray(e["bbox"], np.float64).reshape(2, 2)).reshape(-1)
            extras = {"source": "sidecar", "landmarks_visible": np.asarray(e.get("landmarks_visible", []), bool)}
            for key in ("identity", "expression", "pose_name", "face_prompt", "grid_prompt", "box"):
                if key in e:
                    extras[key] = e[key]
            faces.append(Face(bbox=box, kps=k, landmarks=fit(e["landmarks"]), embedding=v, pose=e["pose"],
                              det_score=1.0, extras=extras))
        return faces

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces found by the learned detector + landmarker (no sidecar involved), best score first."""
        if self.detector is None or self.landmarker is None:
            raise ValueError("this image has no SynthFace sidecar, so the synthetic backend must detect faces, "
                             "but no detector / landmarker was loaded (models_dir needs detector/ and landmarker/)")
        rgb = load_rgb(rgb)
        h, w = rgb.shape[:2]
        if self.native_size is not None and min(h, w) > 2 * self.native_size:
            return self._detect_downsized(rgb)
        boxes, scores = self.detector.detect(rgb, self.score_threshold)
        if len(boxes) == 0:
            return []
        landmarks, poses = self.landmarker.predict([rgb] * len(boxes), boxes)
        kps = np.stack([kps_from_landmarks(lm) for lm in landmarks])
        emb = self.recognizer.embed([rgb] * len(boxes), kps)
        return [Face(bbox=b, kps=k, landmarks=lm, embedding=e, pose=p, det_score=float(s),
                     extras={"source": "detector"})
                for b, k, lm, e, p, s in zip(boxes, kps, landmarks, emb, poses, scores)]

    def _detect_downsized(self, rgb: np.ndarray) -> list[Face]:
        """Detect at ``native_size`` (shorter side), map box / keypoints / landmarks back to ``rgb``; the embedding
        is recomputed on the full-size image."""
        from PIL import Image

        h, w = rgb.shape[:2]
        s = min(h, w) / self.native_size
        small = np.asarray(Image.fromarray(rgb).resize((max(1, round(w / s)), max(1, round(h / s))),
                                                       Image.Resampling.BICUBIC))
        scale = np.array([w / small.shape[1], h / small.shape[0]])

        def up(points):
            pts = np.asarray(points, np.float64)
            return (pts.reshape(-1, 2) + 0.5) * scale - 0.5

        faces = self.detect(small)
        if not faces:
            return []
        kps = np.stack([up(f.kps) for f in faces])
        emb = self.recognizer.embed([rgb] * len(faces), kps)
        out = []
        for f, k, e in zip(faces, kps, emb):
            extras = {**f.extras, "analysed_at": [int(small.shape[0]), int(small.shape[1])]}
            out.append(Face(bbox=up(np.asarray(f.bbox).reshape(2, 2)).reshape(-1), kps=k, landmarks=up(f.landmarks),
                            embedding=e, pose=f.pose, det_score=f.det_score, extras=extras))
        return out
