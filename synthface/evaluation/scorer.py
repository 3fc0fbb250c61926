"""SynthFace's evaluation scorer (:class:`SynthFaceScorer`): the world's own face models in the scorer role of
:mod:`dynamicid_jax.eval.metrics` — its detector and landmarker find faces, the evaluation recogniser (another
architecture and seed than the recogniser the method consumes) embeds them, the attribute classifiers read
expression / pose / background / clothing / placement."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from dynamicid_jax.eval.metrics import FaceDetections
from synthface.evaluation.classifiers import load_eval_models
from synthface.faces.backend import kps_from_landmarks
from synthface.faces.detector import SyntheticDetector, SyntheticLandmarker

__all__ = ["SynthFaceScorer"]


class SynthFaceScorer:
    """SynthFace's evaluation models: detector + landmarker find faces, the evaluation recogniser embeds them, the
    face classifier reads expression / pose from a face box, the scene classifier background / clothing /
    placement from an image region."""

    def __init__(self, recognizer, detector, landmarker, face_classifier=None, scene_classifier=None, *,
                 score_threshold: float | None = None):
        self.recognizer, self.detector, self.landmarker = recognizer, detector, landmarker
        self.face_classifier, self.scene_classifier = face_classifier, scene_classifier
        self.score_threshold = score_threshold

    @classmethod
    def from_models_dir(cls, models_dir: str | os.PathLike, **kwargs) -> SynthFaceScorer:
        """Load ``eval_recognizer/``, ``detector/``, ``landmarker/``, ``face_classifier/``, ``scene_classifier/``."""
        folder = os.fspath(models_dir)
        models = load_eval_models(folder)
        missing = [n for n, m in (("eval_recognizer", models.recognizer), ("face_classifier", models.face_classifier),
                                  ("scene_classifier", models.scene_classifier)) if m is None]
        missing += [n for n in ("detector", "landmarker") if not os.path.isdir(os.path.join(folder, n))]
        if missing:
            raise FileNotFoundError(f"SynthFace models folder {folder!r} lacks {missing} (train them with python -m "
                                    "synthface.train_models --data DATA --out MODELS)")
        return cls(models.recognizer, SyntheticDetector.load(os.path.join(folder, "detector")),
                   SyntheticLandmarker.load(os.path.join(folder, "landmarker")), models.face_classifier,
                   models.scene_classifier, **kwargs)

    def detect(self, images: Sequence[np.ndarray]) -> list[FaceDetections]:
        """Faces of every image (boxes from the detector, keypoints from the landmarker, eval embeddings)."""
        images = [np.asarray(im) for im in images]
        found = [self.detector.detect(im, self.score_threshold) for im in images]
        owners = [i for i, (b, _) in enumerate(found) for _ in range(len(b))]
        dim = self.recognizer.embedding_dim
        if not owners:
            return [FaceDetections.empty(dim) for _ in images]
        boxes = np.concatenate([b for b, _ in found if len(b)])
        crops_of = [images[i] for i in owners]
        landmarks, poses = self.landmarker.predict(crops_of, boxes)
        kps = np.stack([kps_from_landmarks(p) for p in landmarks])
        emb = self.recognizer.embed(crops_of, kps)
        out, start = [], 0
        for b, s in found:
            k = len(b)
            out.append(FaceDetections(np.asarray(b, np.float32), emb[start:start + k], np.asarray(s, np.float32),
                                      poses[start:start + k]))
            start += k
        return out

    def face_labels(self, images: Sequence[np.ndarray], boxes: np.ndarray) -> dict[str, list[str]]:
        """``{"expression": [...], "pose": [...]}`` for one face box per image."""
        if self.face_classifier is None:
            raise ValueError("no face classifier loaded")
        if not len(boxes):
            return {h: [] for h in self.face_classifier.config.head_names}
        return self.face_classifier.predict(list(images), np.asarray(boxes, np.float64))

    def scene_labels(self, images: Sequence[np.ndarray], regions: np.ndarray | None = None) -> dict[str, list[str]]:
        """Background / clothing / placement of whole images, or of pixel ``regions [B, 4]`` (one per image)."""
        if self.scene_classifier is None:
            raise ValueError("no scene classifier loaded")
        if not len(images):
            return {h: [] for h in self.scene_classifier.config.head_names}
        return self.scene_classifier.predict(list(images), None if regions is None else np.asarray(regions))
