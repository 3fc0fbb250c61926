"""Evaluation metrics (docs/method.md §9): FaceSim, multi-ID matching and placement, attribute / expression / pose
accuracy, identity baselines and CLIP-T.

Faces in generated images are *found*, never assumed: a scorer's :meth:`detect` returns, per image, the face boxes
and identity embeddings of an **evaluation** recogniser (on SynthFace the ``eval_recognizer`` — another architecture
and seed than the recogniser the method consumes — ``synthface.evaluation.scorer``; on real photos the chosen
analyzer's, :class:`AnalyzerScorer`). Any object with the same ``detect`` (and, for attribute accuracies,
``face_labels`` / ``scene_labels``) is a scorer. Then:

* **Matching** (:func:`greedy_match`): the most similar (face, reference) pair is matched first, both are removed,
  and so on. Every reference gets at most one face; a reference left without a face is *missed*.
* **FaceSim** of one (image, reference): the cosine of the matched face's embedding with the reference's, **0 when
  the reference was missed** (no face detected counts as a failure); the detection rate is reported beside it, and
  ``*_detected`` variants average over matched faces only.
* **Multi-ID**: per image the mean and the min over its references; **placement**: a reference is placed when its
  matched face's box centre lies inside the reference's own layout box (:func:`placed`).
* **Accuracies**: the fraction of requests whose prediction equals the requested label (a missed face is wrong).
* **Baselines** (:func:`pair_baseline`): the FaceSim a real photo of the *same* person gets (ceiling) and that
  of a *different* person (baseline, the mean over **all** pairs of identities), scored by the same rule as the
  generated images (most similar detected face, 0 when none) against the same reference embeddings.
* **CLIP-T** (:class:`ClipScorer`): cosine of CLIP's projected text and image embeddings (not ×100).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FaceDetections", "Match", "cosine_matrix", "greedy_match", "match_faces", "box_centres", "placed",
           "accuracy", "mean_or_none", "pair_baseline", "identity_baselines", "AnalyzerScorer",
           "reference_embeddings", "view_of_pose", "ClipScorer", "clip_t"]


@dataclasses.dataclass
class FaceDetections:
    """The faces found in one image: ``boxes [K, 4]`` (pixels ``x0, y0, x1, y1``), unit ``embeddings [K, D]``,
    ``scores [K]`` and, where the scorer has them, ``poses [K, 3]`` (pitch, yaw, roll in degrees)."""

    boxes: np.ndarray
    embeddings: np.ndarray
    scores: np.ndarray
    poses: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def empty(cls, dim: int) -> FaceDetections:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0, dim), np.float32), np.zeros((0,), np.float32),
                   np.zeros((0, 3), np.float32))


@dataclasses.dataclass
class Match:
    """Matching of one image's faces to its references: ``face [R]`` (face index, −1 = missed) and
    ``similarity [R]`` (cosine; 0 where missed). With a Euclidean identity metric (dlib) ``similarity`` holds the
    raw-descriptor distance instead (NaN where missed); ``same [R]`` is the metric's same-person decision (False
    where missed; None for a metric without a threshold)."""

    face: np.ndarray
    similarity: np.ndarray
    same: np.ndarray | None = None

    @property
    def matched(self) -> np.ndarray:
        return self.face >= 0


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` cosines of the rows of ``a`` and ``b`` (normalised here)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or (a.size and b.size and a.shape[1] != b.shape[1]):
        raise ValueError(f"cosine_matrix: expected [N, D] and [M, D], got {a.shape} and {b.shape}")
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    return _unit(a) @ _unit(b).T


def greedy_match(similarity: np.ndarray) -> np.ndarray:
    """``similarity [F, R]`` (faces × references) → ``[R]`` face index per reference (−1: none left). The most
    similar remaining pair is taken first; ties go to the lower index."""
    sim = np.array(similarity, np.float64, copy=True)
    if sim.ndim != 2:
        raise ValueError(f"greedy_match: expected a [faces, references] matrix, got shape {sim.shape}")
    out = np.full(sim.shape[1], -1, np.int64)
    for _ in range(min(sim.shape)):
        f, r = np.unravel_index(np.argmax(sim), sim.shape)
        if not np.isfinite(sim[f, r]):
            break
        out[r] = f
        sim[f, :] = -np.inf
        sim[:, r] = -np.inf
    return out


def match_faces(faces: FaceDetections, references: np.ndarray, metric=None) -> Match:
    """Greedy matching of ``faces`` to reference vectors ``[R, D]`` in ``metric``
    (:class:`~dynamicid_jax.faces.IdentityMetric`; default the cosine): the most similar pair first (the
    smallest distance for a Euclidean metric)."""
    if metric is None or metric.kind == "cosine":
        sim = cosine_matrix(faces.embeddings, references)
        face = greedy_match(sim)
        similarity = np.array([sim[f, r] if f >= 0 else 0.0 for r, f in enumerate(face)], np.float64)
        same = None if metric is None or metric.threshold is None else \
            np.array([f >= 0 and bool(metric.same(sim[f, r])) for r, f in enumerate(face)])
        return Match(face, similarity, same)
    refs = np.asarray(references, np.float64)
    dist = metric.matrix(faces.embeddings, refs) if len(faces) else np.zeros((0, len(refs)))
    face = greedy_match(-dist)
    distance = np.array([dist[f, r] if f >= 0 else np.nan for r, f in enumerate(face)], np.float64)
    same = np.array([f >= 0 and bool(metric.same(dist[f, r])) for r, f in enumerate(face)])
    return Match(face, distance, same)


def box_centres(boxes: np.ndarray) -> np.ndarray:
    """``[K, 2]`` centres ``(x, y)`` of ``[K, 4]`` pixel boxes ``x0, y0, x1, y1``."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], -1)


def placed(match: Match, faces: FaceDetections, layout: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """``[R]`` bool: reference ``r``'s matched face has its centre inside ``layout[r]`` (normalised
    ``[y0, x0, y1, x1]``; pixel centres at integer coordinates, so a box spans ``[x0·W − ½, x1·W − ½]``)."""
    layout = np.asarray(layout, np.float64).reshape(-1, 4)
    if len(layout) != len(match.face):
        raise ValueError(f"placed: {len(layout)} layout boxes for {len(match.face)} references")
    h, w = image_size
    out = np.zeros(len(layout), bool)
    if len(faces) == 0:
        return out
    centres = box_centres(faces.boxes)
    for r, f in enumerate(match.face):
        if f < 0:
            continue
        x, y = centres[f] + 0.5
        y0, x0, y1, x1 = layout[r]
        out[r] = x0 * w <= x < x1 * w and y0 * h <= y < y1 * h
    return out


def accuracy(predicted: Sequence[Any], requested: Sequence[Any]) -> float | None:
    """Fraction of equal pairs (``None`` predictions — missed faces — are wrong); ``None`` for no requests."""
    if len(predicted) != len(requested):
        raise ValueError(f"accuracy: {len(predicted)} predictions for {len(requested)} requests")
    if not len(requested):
        return None
    return float(np.mean([p is not None and p == q for p, q in zip(predicted, requested)]))


def mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def pair_baseline(sim: np.ndarray, image_ids: Sequence[Any], reference_ids: Sequence[Any]) -> dict[str, Any]:
    """Same-identity ceiling and different-identity baseline from ``sim [images, references]`` (FaceSim of
    every real image against every reference; reference ``j`` shows identity ``reference_ids[j]``).

    ``same``: each image against its own identity's reference. ``pairs``: for every unordered pair ``{a, b}`` of
    identities, the mean of (images of ``a`` vs ``b``'s reference) and (images of ``b`` vs ``a``'s); the
    baseline is the mean over all ``n(n−1)/2`` pairs. ``per_image_different``: each image's mean over the other
    identities' references (its mean equals the baseline when every identity has as many images)."""
    sim = np.asarray(sim, np.float64)
    ids, ref_ids = list(image_ids), list(reference_ids)
    if sim.shape != (len(ids), len(ref_ids)):
        raise ValueError(f"pair_baseline: similarity {sim.shape} for {len(ids)} images × {len(ref_ids)} references")
    if len(set(ref_ids)) != len(ref_ids) or len(ref_ids) < 2:
        raise ValueError("pair_baseline needs one reference per identity and at least two identities")
    col = {r: j for j, r in enumerate(ref_ids)}
    missing = sorted({i for i in ids if i not in col}, key=str)
    if missing:
        raise ValueError(f"pair_baseline: images of identities {missing} have no reference")
    own = np.array([col[i] for i in ids])
    rows = np.arange(len(ids))
    same = sim[rows, own]
    other = (sim.sum(axis=1) - same) / (len(ref_ids) - 1)
    pairs = {}
    for a in range(len(ref_ids)):
        for b in range(a + 1, len(ref_ids)):
            cells = np.concatenate([sim[own == a, b], sim[own == b, a]])
            if len(cells):
                pairs[(ref_ids[a], ref_ids[b])] = float(cells.mean())
    return {"same": same, "per_image_different": other, "pairs": pairs,
            "same_identity": float(same.mean()), "different_identity": float(np.mean(list(pairs.values())))}


def identity_baselines(reference_embeddings: np.ndarray, reference_ids: Sequence[Any], embeddings: np.ndarray,
                       ids: Sequence[Any]) -> dict[str, Any]:
    """Cosine ceiling and baseline of real photos (``embeddings``, one per photo, of identities ``ids``) against one
    reference per identity: :func:`pair_baseline` on their cosines. ``embeddings`` must not contain the reference
    photos themselves. ``same_pairs``: photos scored against their own reference; ``different_pairs``: identity
    pairs (``n(n−1)/2``)."""
    ref_ids = list(reference_ids)
    if len(set(ref_ids)) < 2 or not set(ids) & set(ref_ids):
        raise ValueError("identity_baselines needs photos of the references' own people and of other people")
    pb = pair_baseline(cosine_matrix(embeddings, reference_embeddings), ids, ref_ids)
    return {"same_identity": pb["same_identity"], "different_identity": pb["different_identity"],
            "same_pairs": int(len(pb["same"])), "different_pairs": len(pb["pairs"])}


# ------------------------------------------------------------------------------------------------- scorers
def view_of_pose(pose: Sequence[float]) -> str:
    """The view word of the automatic face prompt: ``"front"`` when |yaw| < 10°, else ``"side"``."""
    return "front" if abs(float(pose[1])) < 10 else "side"


class AnalyzerScorer:
    """Real photos: a :class:`~dynamicid_jax.faces.FaceAnalyzer` (insightface / dlib) finds and embeds faces; no
    attribute classifiers (expression accuracy is not available), the pose is the analyzer's. Identities are
    compared in the analyzer's own metric (``self.metric``; dlib: raw-descriptor Euclidean distance < 0.6), so
    the detections carry the vectors that metric compares."""

    face_classifier = None
    scene_classifier = None

    def __init__(self, analyzer):
        from dynamicid_jax.faces.identity import identity_metric

        self.analyzer = analyzer
        self.metric = identity_metric(analyzer)

    def detect(self, images: Sequence[np.ndarray]) -> list[FaceDetections]:
        from dynamicid_jax.faces.identity import identity_vector

        out = []
        for im in images:
            faces = self.analyzer.analyze(np.asarray(im))
            if not faces:
                out.append(FaceDetections.empty(self.analyzer.embedding_dim))
                continue
            out.append(FaceDetections(np.stack([np.asarray(f.bbox, np.float32) for f in faces]),
                                      np.stack([identity_vector(f, self.metric) for f in faces]).astype(np.float32),
                                      np.array([f.det_score for f in faces], np.float32),
                                      np.stack([np.asarray(f.pose, np.float32) for f in faces])))
        return out


def reference_embeddings(scorer, images: Sequence[np.ndarray], names: Sequence[str] | None = None,
                         keypoints: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """``[N, D]``: the most confident face of each reference image (none → :class:`NoFaceError`).

    ``keypoints`` (``[5, 2]`` per image, e.g. a SynthFace render's exact ones) embed each reference at those
    keypoints with the scorer's recogniser instead of detecting it (a scorer with a ``recognizer``, e.g. SynthFace's):
    references then do not depend on the detector's quality."""
    from dynamicid_jax.faces import NoFaceError

    if keypoints is not None:
        if not hasattr(scorer, "recognizer"):
            raise ValueError("keypoints= needs a scorer with a recogniser (e.g. SynthFace's SynthFaceScorer)")
        if len(keypoints) != len(images):
            raise ValueError(f"keypoints: one [5, 2] array per reference image ({len(images)}), got {len(keypoints)}")
        emb = scorer.recognizer.embed([np.asarray(im) for im in images], np.asarray(keypoints, np.float64))
        return _unit(np.asarray(emb, np.float64)).astype(np.float32)
    out = []
    for i, det in enumerate(scorer.detect(images)):
        if not len(det):
            name = names[i] if names else f"reference {i}"
            raise NoFaceError(f"the evaluation scorer finds no face in {name}; a reference must show one face")
        out.append(det.embeddings[int(np.argmax(det.scores))])
    return np.stack(out)


# --------------------------------------------------------------------------------------------------- CLIP-T
def clip_t(text_embeds: np.ndarray, image_embeds: np.ndarray) -> np.ndarray:
    """Row-wise cosine of paired text and image embeddings ``[B, D]`` → ``[B]`` in ``[-1, 1]``."""
    t, v = np.asarray(text_embeds), np.asarray(image_embeds)
    if t.shape != v.shape or t.ndim != 2:
        raise ValueError(f"clip_t: expected two [B, D] arrays of one shape, got {t.shape} and {v.shape}")
    return np.sum(_unit(t) * _unit(v), axis=-1)


class ClipScorer:
    """CLIP-T with our own encoders: a transformers ``CLIPModel`` folder (CLIP ViT-L/14 for SD1.5 papers) gives the
    text tower, ``text_projection`` and the vision tower with ``visual_projection``."""

    def __init__(self, text_model, text_params, text_projection: np.ndarray, vision_model, vision_params, tokenizer):
        self.text_model, self.text_params = text_model, text_params
        self.text_projection = jnp.asarray(text_projection, jnp.float32)  # [proj, hidden] (torch Linear weight)
        self.vision_model, self.vision_params = vision_model, vision_params
        self.tokenizer = tokenizer
        self._text = jax.jit(lambda p, w, ids: self.text_model.apply({"params": p}, ids).pooler_output @ w.T)
        self._image = jax.jit(lambda p, px: self.vision_model.apply({"params": p}, px,
                                                                    output_hidden_states=False).image_embeds)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ClipScorer:
        from dynamicid_jax.models.clip import load_image_encoder, load_text_encoder
        from dynamicid_jax.tokenizer import load_tokenizer
        from dynamicid_jax.weights import keymap as km

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"CLIP folder {path!r} does not exist (expected a transformers CLIPModel folder, "
                                    "e.g. openai/clip-vit-large-patch14)")
        state, source = km.read_weights(path, "model")
        if "text_projection.weight" not in state or "visual_projection.weight" not in state:
            raise ValueError(f"{source} is not a full CLIPModel checkpoint (CLIP-T needs text_projection and "
                             "visual_projection)")
        text_model, text_params = load_text_encoder(path)
        vision_model, vision_params = load_image_encoder(path)
        has_tok = any(os.path.isfile(os.path.join(path, n)) for n in ("vocab.json", "tokenizer.json"))
        return cls(text_model, text_params, state["text_projection.weight"], vision_model, vision_params,
                   load_tokenizer(path if has_tok else None))

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        from dynamicid_jax.tokenizer import tokenize

        ids = tokenize(self.tokenizer, list(prompts), max_length=self.text_model.config.max_position_embeddings)
        return np.asarray(self._text(self.text_params, self.text_projection, jnp.asarray(ids)))

    def image_embeds(self, images: Sequence[np.ndarray]) -> np.ndarray:
        from dynamicid_jax.models.clip import clip_preprocess

        pixels = clip_preprocess(list(images), size=self.vision_model.config.image_size)
        return np.asarray(self._image(self.vision_params, jnp.asarray(pixels)))

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """``[B]`` CLIP-T of each image with its prompt."""
        if len(images) != len(prompts):
            raise ValueError(f"ClipScorer.score: {len(images)} images for {len(prompts)} prompts")
        return clip_t(self.text_embeds(prompts), self.image_embeds(images))
