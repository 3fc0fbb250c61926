"""Scores of an evaluation suite's generated images: per-unit samples, means with bootstrap intervals, the
protocol's sizing limits. Shared by every suite (``infer.eval --suite real`` and the SynthFace world's suite,
whose real-image baselines and targets live with it).

**One rule for every FaceSim** (generated images, the base's own images, real photos for the baselines): the
scorer detects faces, the faces are greedily matched to the image's reference embeddings
(:func:`~dynamicid_jax.eval.metrics.match_faces`: with one reference, the most similar detected face), and a
reference left without a face scores **0**. Expression / pose labels are read at the matched face's box (no face:
wrong).

**Units and intervals** (:mod:`.bootstrap`, 95 %, fixed seed per metric so two runs and two methods resample
alike): single-ID FaceSim, attributes — one generated image, stratified by identity (plus an identity-cluster
interval for FaceSim); multi-ID — one two-person image (its placement is the mean over its faces), stratified by
identity pair; Expr, edit FaceSim and its drop — one edit image (the drop pairs each edit with the unedited
control of the same caption, seed and batch row), stratified by identity.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from dynamicid_jax.eval import bootstrap as B
from dynamicid_jax.eval import metrics as M
from dynamicid_jax.eval.metrics import pair_baseline

__all__ = ["Samples", "collect_samples", "summarise", "score_outputs", "facesim_matrix", "pair_baseline",
           "vae_round_trip", "seed_of", "HALF_WIDTH_LIMITS", "HEADLINE"]

#: The largest acceptable 95 % half-width of each headline metric (the protocol is sized for these).
HALF_WIDTH_LIMITS = {"facesim": 0.05, "placement": 0.10, "expression_accuracy": 0.10}
#: (part, metric) of the headline numbers whose intervals the sizing checks, with their limit's key.
HEADLINE = ((("single", "facesim"), "facesim"), (("multi", "placement"), "placement"),
            (("edit", "expression_accuracy"), "expression_accuracy"))


def seed_of(seed: int, name: str) -> int:
    """One seed per metric name (the same for every method, so replicates are paired across methods)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**32


# --------------------------------------------------------------------------------------------------- samples
@dataclasses.dataclass
class Samples:
    """Per-unit values of one method's outputs (lists in request order, so two methods' samples align)."""

    metric: Any = None  # the scorer's IdentityMetric (None: cosine)
    single_sim: list = dataclasses.field(default_factory=list)
    single_same: list = dataclasses.field(default_factory=list)
    multi_same: list = dataclasses.field(default_factory=list)
    edit_same: list = dataclasses.field(default_factory=list)
    single_hit: list = dataclasses.field(default_factory=list)
    single_group: list = dataclasses.field(default_factory=list)
    single_attr: dict = dataclasses.field(default_factory=lambda: {"background": [], "clothing": [], "placement": []})
    single_attr_images: list = dataclasses.field(default_factory=list)
    multi_sim: list = dataclasses.field(default_factory=list)  # [R] per image
    multi_hit: list = dataclasses.field(default_factory=list)
    multi_placed: list = dataclasses.field(default_factory=list)  # [R] bools per image
    multi_group: list = dataclasses.field(default_factory=list)
    multi_attr: list = dataclasses.field(default_factory=list)  # (image index, region, head, truth)
    multi_attr_images: list = dataclasses.field(default_factory=list)
    edit_sim: list = dataclasses.field(default_factory=list)
    edit_hit: list = dataclasses.field(default_factory=list)
    edit_group: list = dataclasses.field(default_factory=list)
    edit_key: list = dataclasses.field(default_factory=list)  # (group, seed, row): its control
    edit_jobs: list = dataclasses.field(default_factory=list)  # (request, image, box or None, pose or None)
    control_sim: dict = dataclasses.field(default_factory=dict)  # (group, seed, row) → FaceSim
    control_hit: dict = dataclasses.field(default_factory=dict)
    clip: dict = dataclasses.field(default_factory=lambda: {"single": [], "multi": [], "edit": [], "control": []})


def _strip_regions(boxes: Sequence[Sequence[float]], h: int, w: int) -> np.ndarray:
    return np.array([[x0 * w - 0.5, y0 * h - 0.5, x1 * w - 0.5, y1 * h - 0.5] for y0, x0, y1, x1 in boxes])


def collect_samples(outputs: Sequence[tuple[Any, np.ndarray]], scorer, references: np.ndarray,
                    clip: M.ClipScorer | None = None) -> Samples:
    """Detect, match and record every unit of one method's ``(request, images)`` outputs."""
    s = Samples(metric=getattr(scorer, "metric", None))
    for request, images in outputs:
        dets = scorer.detect(list(images))
        refs = references[list(request.refs)]
        for b, (image, det) in enumerate(zip(images, dets)):
            match = M.match_faces(det, refs, s.metric)
            same = None if match.same is None else match.same.tolist()
            attrs = request.attributes[b] if request.attributes else None
            if request.kind == "single":
                s.single_sim.append(float(match.similarity[0]))
                s.single_hit.append(bool(match.matched[0]))
                s.single_group.append(request.refs[0])
                s.single_same.append(None if same is None else same[0])
                if attrs:
                    s.single_attr_images.append(image)
                    for k in s.single_attr:
                        s.single_attr[k].append(attrs[k])
            elif request.kind == "multi":
                s.multi_sim.append(match.similarity.tolist())
                s.multi_hit.append(match.matched.tolist())
                s.multi_placed.append(M.placed(match, det, np.asarray(request.boxes), image.shape[:2]).tolist())
                s.multi_group.append("-".join(map(str, request.refs)))
                s.multi_same.append(same)
                if attrs:
                    n = len(s.multi_sim) - 1
                    for r, region in enumerate(_strip_regions(request.boxes, *image.shape[:2])):
                        s.multi_attr_images.append((image, region))
                        s.multi_attr.append((n, "background", attrs["background"]))
                        s.multi_attr_images.append((image, region))
                        s.multi_attr.append((n, "clothing", attrs["clothing"][r]))
            elif request.kind == "control":
                key = (request.group, request.seed, b)
                s.control_sim[key], s.control_hit[key] = float(match.similarity[0]), bool(match.matched[0])
            else:
                f = int(match.face[0])
                s.edit_sim.append(float(match.similarity[0]))
                s.edit_hit.append(bool(match.matched[0]))
                s.edit_group.append(request.group)
                s.edit_same.append(None if same is None else same[0])
                s.edit_key.append((request.group, request.seed, b))
                s.edit_jobs.append((request, image, det.boxes[f] if f >= 0 else None,
                                    det.poses[f] if f >= 0 and det.poses is not None else None))
        if clip is not None:
            s.clip[request.kind].extend(clip.score(list(images), list(request.prompts)).tolist())
    return s


def _labels_at(scorer, jobs) -> dict[str, list]:
    """Expression / pose predicted at each job's face box (``None`` where no face was matched)."""
    labels: dict[str, list] = {"expression": [None] * len(jobs), "pose": [None] * len(jobs)}
    idx = [i for i, j in enumerate(jobs) if j[2] is not None]
    if idx and scorer.face_classifier is not None:
        pred = scorer.face_labels([jobs[i][1] for i in idx], np.stack([jobs[i][2] for i in idx]))
        for head in ("expression", "pose"):
            for i, v in zip(idx, pred.get(head, [])):
                labels[head][i] = v
    elif idx:  # real photos: only the view (front / side) from the analyzer's pose
        for i in idx:
            if jobs[i][3] is not None:
                labels["pose"][i] = M.view_of_pose(jobs[i][3])
    return labels


# ------------------------------------------------------------------------------------------------- summaries
class _Stats:
    """Draws each metric's bootstrap replicates (seeded by the metric's name) and keeps the image-unit ones."""

    def __init__(self, seed: int, n_boot: int):
        self.seed, self.n_boot = seed, n_boot
        self.reps: dict[str, np.ndarray] = {}

    def mean(self, name: str, values, groups, unit: str = "image") -> B.Interval | None:
        v = np.asarray(values, np.float64)
        if not len(v):
            return None
        reps = B.replicates(v, groups, unit=unit, n_boot=self.n_boot, seed=seed_of(self.seed, name + "/" + unit))
        if unit == "image":
            self.reps[name] = reps
        return B.interval(v, groups, unit=unit, reps=reps)


def summarise(samples: Samples, scorer, *, seed: int = 0, n_boot: int = B.DEFAULT_BOOT
              ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(metrics, replicates)``: every metric of one method with its interval (``metrics[part]["ci"][name]``),
    and the bootstrap replicates by ``"part.metric"`` (for paired differences between methods)."""
    st = _Stats(seed, n_boot)
    out: dict[str, Any] = {}

    def put(part: str, name: str, values, groups, unit: str = "image") -> None:
        ci = st.mean(f"{part}.{name}", values, groups, unit)
        if ci is None:
            return
        out.setdefault(part, {}).setdefault("ci" if unit == "image" else "ci_identity", {})[name] = ci.to_dict()
        if unit == "image":
            out[part][name] = ci.estimate

    attr_sets: list[tuple[float, np.ndarray, int]] = []
    distance = samples.metric is not None and samples.metric.kind == "euclidean"

    def identity(part: str, values, hits, same, groups) -> None:
        """FaceSim (cosine; missed = 0) — or, for a distance metric (dlib), the same-person rate (missed = not
        the same person) and the mean distance of the found faces."""
        v, hit = np.asarray(values, np.float64), np.asarray(hits, bool)
        if same and same[0] is not None:
            put(part, "same_person_rate", np.asarray(same, float).reshape(len(v), -1).mean(1), groups)
        if distance:
            found = v[np.isfinite(v)]
            out.setdefault(part, {})["identity_distance"] = float(found.mean()) if len(found) else None
            out[part]["metric"] = samples.metric.to_dict()
            return
        put(part, "facesim", v, groups)
        out[part]["facesim_detected"] = float(v[hit].mean()) if hit.any() else None

    if s := samples.single_sim:
        g = samples.single_group
        hit = np.asarray(samples.single_hit, bool)
        identity("single", s, hit, samples.single_same, g)
        if not distance:
            put("single", "facesim", s, g, unit="identity")
        put("single", "detection_rate", hit.astype(float), g)
        out["single"].update(images=len(s), faces=len(s))
        if samples.single_attr_images and scorer.scene_classifier is not None:
            pred = scorer.scene_labels(samples.single_attr_images)
            per_head = {k: np.array([p == t for p, t in zip(pred.get(k, [None] * len(v)), v)], float)
                        for k, v in samples.single_attr.items() if len(v)}
            out["single"]["attributes"] = {k: float(v.mean()) for k, v in per_head.items()}
            put("single", "attribute_accuracy", np.mean(np.stack(list(per_head.values())), axis=0), g)
            attr_sets.append((out["single"]["attribute_accuracy"], st.reps["single.attribute_accuracy"], len(s)))
    if samples.multi_sim:
        sim, placed = np.asarray(samples.multi_sim), np.asarray(samples.multi_placed, float)
        hit, g = np.asarray(samples.multi_hit, bool), samples.multi_group
        if samples.multi_same and samples.multi_same[0] is not None:
            put("multi", "same_person_rate", np.asarray(samples.multi_same, float).mean(1), g)
        if not distance:
            put("multi", "facesim_mean", sim.mean(1), g)
            put("multi", "facesim_min", sim.min(1), g)
            for r, side in enumerate(("left", "right", "third", "fourth")[:sim.shape[1]]):
                put("multi", f"facesim_{side}", sim[:, r], g)
        put("multi", "placement", placed.mean(1), g)
        put("multi", "detection_rate", hit.mean(1), g)
        out["multi"].update(images=len(sim), faces=int(sim.size))
        if samples.multi_attr and scorer.scene_classifier is not None:
            images = [a[0] for a in samples.multi_attr_images]
            regions = np.stack([a[1] for a in samples.multi_attr_images])
            pred = scorer.scene_labels(images, regions)
            correct = np.zeros(len(sim))
            count = np.zeros(len(sim))
            heads: dict[str, list] = {}
            for (n, head, truth), k in zip(samples.multi_attr, range(len(samples.multi_attr))):
                ok = pred.get(head, [None] * len(images))[k] == truth
                correct[n] += ok
                count[n] += 1
                heads.setdefault(head, []).append(ok)
            out["multi"]["attributes"] = {k: float(np.mean(v)) for k, v in heads.items()}
            put("multi", "attribute_accuracy", correct / np.maximum(count, 1), g)
            attr_sets.append((out["multi"]["attribute_accuracy"], st.reps["multi.attribute_accuracy"], len(sim)))
    if samples.edit_sim:
        g = samples.edit_group
        identity("edit", samples.edit_sim, samples.edit_hit, samples.edit_same, g)
        labels = _labels_at(scorer, samples.edit_jobs)
        for head, attr in (("expression", "expression"), ("pose", "pose")):
            rows = [i for i, j in enumerate(samples.edit_jobs) if getattr(j[0], attr)]
            if head == "expression" and scorer.face_classifier is None:
                out["edit"]["expression_accuracy"] = None  # no expression classifier for real photos
                continue
            if not rows:
                continue
            ok = [labels[head][i] is not None and labels[head][i] == getattr(samples.edit_jobs[i][0], attr)
                  for i in rows]
            put("edit", f"{head}_accuracy", np.asarray(ok, float), [g[i] for i in rows])
            per: dict[str, list] = {}
            for i, v in zip(rows, ok):
                per.setdefault(getattr(samples.edit_jobs[i][0], attr), []).append(v)
            out["edit"][f"per_{head}"] = {q: float(np.mean(v)) for q, v in per.items()}
        paired = [i for i, k in enumerate(samples.edit_key) if k in samples.control_sim]
        if paired and not distance:
            control = [samples.control_sim[samples.edit_key[i]] for i in paired]
            put("edit", "facesim_unedited", control, [g[i] for i in paired])
            put("edit", "facesim_drop", np.asarray(control) - np.asarray(samples.edit_sim)[paired],
                [g[i] for i in paired])
        hit = np.asarray(samples.edit_hit, float)
        out["edit"].update(images=len(samples.edit_sim), faces=len(samples.edit_sim),
                           detection_rate=float(hit.mean()))
    for kind, values in samples.clip.items():
        if values and kind in out:
            out[kind]["clip_t"] = float(np.mean(values))
    if attr_sets:  # the mean of the single- and multi-ID attribute accuracies (replicates averaged alike)
        est = float(np.mean([a for a, _, _ in attr_sets]))
        reps = np.mean(np.stack([r for _, r, _ in attr_sets]), axis=0)
        st.reps["attribute_accuracy"] = reps
        lo, hi = np.quantile(reps, [0.025, 0.975])
        out["attribute_accuracy"] = est
        out["attribute_accuracy_ci"] = {"estimate": est, "low": float(lo), "high": float(hi),
                                        "half_width": float(hi - lo) / 2, "unit": "image",
                                        "n": int(sum(n for _, _, n in attr_sets))}
    else:
        out["attribute_accuracy"] = None
    return out, st.reps


def score_outputs(outputs, scorer, references: np.ndarray, clip: M.ClipScorer | None = None, *, seed: int = 0
                  ) -> dict[str, Any]:
    """Every metric of one method's outputs (``references``: the evaluation embeddings ``[N, D]``), with
    intervals; see the module docstring."""
    return summarise(collect_samples(outputs, scorer, references, clip), scorer, seed=seed)[0]


# ------------------------------------------------------------------------------------------------ baselines
def facesim_matrix(detections: Sequence[M.FaceDetections], references: np.ndarray) -> np.ndarray:
    """``[images, references]`` FaceSim of each image against each reference **alone**, by the generated images'
    rule: the most similar detected face, 0 when the image has no face."""
    out = np.zeros((len(detections), len(references)))
    for i, det in enumerate(detections):
        if len(det):
            out[i] = M.cosine_matrix(det.embeddings, references).max(axis=0)
    return out


def vae_round_trip(vae_source, images: np.ndarray, chunk: int = 32) -> np.ndarray:
    """``images`` through the base's VAE (posterior mean in, decoder out) as ``uint8``."""
    from dynamicid_jax.models.vae import decode_latents, encode_to_latents
    from dynamicid_jax.pipelines.sampling import to_uint8

    vae, params = vae_source
    out = []
    for i in range(0, len(images), chunk):
        z = encode_to_latents(vae, params, np.asarray(images[i:i + chunk]), None)
        out.append(np.asarray(to_uint8(decode_latents(vae, params, z))))
    return np.concatenate(out)
