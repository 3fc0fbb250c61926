"""The SynthFace evaluation protocol: held-out identities, prompts, seeds and scenes; the methods; the scores.

**Requests** (:func:`synthface_requests`, deterministic from ``Protocol.seed``; every method gets the same
prompts, references and seeds, hence the same initial noise):

* ``single`` — each of the first ``single_identities`` held-out identities (reference: its ``neutral_front``
  image) with ``single_prompts`` SynthFace captions (background, clothing, placement drawn like the data's),
  ``batch`` prompts per call;
* ``multi`` — ``multi_pairs`` pairs of held-out identities side by side in one ``size × 2·size`` image (the
  layout of SynthFace's group scenes), left/right layout boxes (``layout="row"``: SAA routes each identity to
  its box), a scene caption naming the background and each person's clothing;
* ``edit`` — each of the first ``edit_identities`` identities, one caption and one seed, × every expression in
  ``edit_expressions`` (front view) and every pose in ``edit_poses`` (neutral): the KDEF-style face prompt
  ``"the expression is {e}, the face is {p}"`` goes to the IMR (DynamicID, w/o SAA) *and* is appended to the text
  prompt (all methods); ``batch`` images (noise samples) per request;
* ``control`` — the same caption and seed without any request: the unedited FaceSim that edits are compared with.

**Methods**: ``dynamicid`` (SAA + IMR), ``no-saa`` (same weights, ``activate_query=False``), ``no-imr`` (same
weights; requests only in the text), ``infinite-id`` (two references are mixed, it has no layout) and
``infinite-id-no-adain`` (the same weights with AdaIN-mean off: the scene-attribute prompts show what it
changes). All 64-px requests have one batch size, so each method compiles one program per image shape.

**Scores** (:func:`score_outputs`, definitions in :mod:`.metrics`): FaceSim of single-ID images; matched
multi-ID FaceSim (mean, min) and placement; prompt-attribute accuracy (scene classifier on the whole image,
or per layout strip for multi-ID); Expr accuracy over the expression edits and Pose accuracy over all edits
(face classifier on the matched face); FaceSim of edits and its drop from the controls; detection rates.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.synthface import dataset as sf_data
from data_pipelines.synthface import world
from dynamicid_jax.eval import metrics as M

__all__ = ["METHODS", "INFINITE_ID_METHODS", "Protocol", "Request", "synthface_requests", "load_pipelines",
           "generate", "run_method", "score_outputs", "synthface_baselines", "synthface_targets", "preview_grids",
           "run_synthface"]

METHODS = ("dynamicid", "no-saa", "no-imr", "infinite-id", "infinite-id-no-adain")
INFINITE_ID_METHODS = ("infinite-id", "infinite-id-no-adain")
EDIT_EXPRESSIONS = world.EXPRESSIONS


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Sizes of the SynthFace protocol (see the module docstring). :meth:`quick` is the test-sized one."""

    single_identities: int = 2
    single_prompts: int = 4
    multi_pairs: int = 1
    multi_prompts: int = 2
    edit_identities: int = 1
    edit_expressions: tuple[str, ...] = EDIT_EXPRESSIONS
    edit_poses: tuple[str, ...] = ("left", "right")
    batch: int = 2
    steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0

    def __post_init__(self):
        for name in ("single_identities", "single_prompts", "multi_prompts", "batch", "steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Protocol.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("multi_pairs", "edit_identities"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"Protocol.{name} must be >= 0, got {getattr(self, name)!r}")
        bad = [e for e in self.edit_expressions if e not in world.EXPRESSIONS]
        bad += [p for p in self.edit_poses if p not in world.POSES]
        if bad:
            raise ValueError(f"unknown edit expressions / poses {bad}; expressions {world.EXPRESSIONS}, poses "
                             f"{world.POSES}")
        object.__setattr__(self, "edit_expressions", tuple(self.edit_expressions))
        object.__setattr__(self, "edit_poses", tuple(self.edit_poses))

    @classmethod
    def quick(cls, **overrides) -> Protocol:
        """A few images per part and 2 denoising steps: checks that everything runs, not quality."""
        base = dict(single_identities=2, single_prompts=2, multi_pairs=1, multi_prompts=2, edit_identities=1,
                    edit_expressions=("neutral", "happy", "surprised"), edit_poses=(), batch=2, steps=2)
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["edit_expressions"], d["edit_poses"] = list(self.edit_expressions), list(self.edit_poses)
        return d


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation call: ``len(prompts)`` images showing the references ``refs`` (indices into the suite's
    reference list). ``face_prompt``: the IMR request of the (single) identity; ``expression`` / ``pose``: the
    requested labels; ``attributes``: per prompt, what it names (``background``, ``clothing`` — a list for
    multi-ID —, ``placement``); ``boxes``: normalised layout boxes, one per reference (multi-ID)."""

    kind: str
    refs: tuple[int, ...]
    prompts: tuple[str, ...]
    seed: int
    height: int
    width: int
    face_prompt: str | None = None
    expression: str | None = None
    pose: str | None = None
    attributes: tuple[dict, ...] = ()
    boxes: tuple[tuple[float, ...], ...] | None = None
    group: int = 0  # the edit identity a control / edit belongs to


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _chunks(items: Sequence, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _rng(seed: int, part: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), 9000 + part, int(index)]))


def synthface_requests(protocol: Protocol, num_references: int, size: int) -> list[Request]:
    """Every request of the protocol for ``num_references`` held-out identities at ``size`` px. Each part and
    identity draws its captions from its own generator, so changing one size leaves the other parts alone."""
    p = protocol
    if num_references < 1:
        raise ValueError("the SynthFace protocol needs at least one held-out identity")
    out: list[Request] = []
    for i in range(min(p.single_identities, num_references)):
        rng = _rng(p.seed, 0, i)
        scenes = [world.sample_scene(rng) for _ in range(p.single_prompts)]
        for c, chunk in enumerate(_chunks(scenes, p.batch)):
            chunk = list(chunk) + [chunk[-1]] * (p.batch - len(chunk))  # one batch size: one program
            out.append(Request("single", (i,), tuple(sf_data.caption_for(s.background, s.clothing, s.placement)
                                                     for s in chunk), p.seed + 100 * i + c, size, size,
                               attributes=tuple(s.to_dict() for s in chunk)))
    if num_references >= 2:
        boxes = tuple(tuple(float(v) for v in b) for b in _layout(2))
        for k in range(p.multi_pairs):
            pair = (2 * k % num_references, (2 * k + 1) % num_references)
            if pair[0] == pair[1]:
                pair = (pair[0], (pair[0] + 1) % num_references)
            rng = _rng(p.seed, 1, k)
            scenes = []
            for _ in range(p.multi_prompts):
                background = list(world.BACKGROUNDS)[int(rng.integers(len(world.BACKGROUNDS)))]
                options = [c for c in world.CLOTHING if c != background]
                clothing = [options[int(rng.integers(len(options)))] for _ in pair]
                scenes.append({"background": background, "clothing": clothing})
            for c, chunk in enumerate(_chunks(scenes, p.batch)):
                chunk = list(chunk) + [chunk[-1]] * (p.batch - len(chunk))
                prompts = tuple(f"a photo of two people side by side, the person on the left wears "
                                f"{_a(s['clothing'][0])} shirt, the person on the right wears {_a(s['clothing'][1])} "
                                f"shirt, {s['background']} background" for s in chunk)
                out.append(Request("multi", pair, prompts, p.seed + 10_000 + 100 * k + c, size, 2 * size,
                                   attributes=tuple(chunk), boxes=boxes))
    for e in range(min(p.edit_identities, num_references)):
        s = world.sample_scene(_rng(p.seed, 2, e))
        caption = sf_data.caption_for(s.background, s.clothing, s.placement)
        seed = p.seed + 20_000 + 100 * e
        attrs = (s.to_dict(),) * p.batch
        out.append(Request("control", (e,), (caption,) * p.batch, seed, size, size, attributes=attrs, group=e))
        asks = [(x, "front", True) for x in p.edit_expressions] + [("neutral", q, False) for q in p.edit_poses]
        for expression, pose, expression_edit in asks:
            face_prompt = world.grid_prompt(expression, pose)
            out.append(Request("edit", (e,), (f"{caption}, {face_prompt}",) * p.batch, seed, size, size,
                               face_prompt=face_prompt, expression=expression if expression_edit else None,
                               pose=pose, attributes=attrs, group=e))
    return out


def _layout(n: int) -> np.ndarray:
    from dynamicid_jax.methods.saa import layout_boxes

    return layout_boxes(n, "row")


# ---------------------------------------------------------------------------------------------- the methods
def load_pipelines(methods: Sequence[str], sd_path: str, *, dynamicid_path: str | None = None,
                   infinite_id_path: str | None = None, analyzer: Any = "synthetic",
                   analyzer_kwargs: dict | None = None, dynamicid_image_encoder: str | None = None,
                   infinite_id_image_encoder: str | None = None) -> dict[str, Any]:
    """``{"dynamicid": DynamicIDPipeline, "infinite-id": InfiniteIDPipeline}`` as far as ``methods`` need them
    (one SD base, loaded once). Missing weights for a requested method → ``ValueError`` naming the option."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    need_did = any(m not in INFINITE_ID_METHODS for m in methods)
    need_iid = any(m in INFINITE_ID_METHODS for m in methods)
    if need_did and not dynamicid_path:
        raise ValueError(f"methods {[m for m in methods if m not in INFINITE_ID_METHODS]} need the DynamicID "
                         "weights (--dynamicid DIR)")
    if need_iid and not infinite_id_path:
        raise ValueError(f"methods {[m for m in methods if m in INFINITE_ID_METHODS]} need the Infinite-ID weights "
                         "(--infinite-id DIR)")
    for what, path in (("SD base", sd_path), ("DynamicID", dynamicid_path if need_did else None),
                       ("Infinite-ID", infinite_id_path if need_iid else None)):
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"{what} weights {path!r} do not exist")
    from dynamicid_jax.faces import get_analyzer
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion

    if isinstance(analyzer, str):
        analyzer = get_analyzer(analyzer, **(analyzer_kwargs or {}))
    sd = StableDiffusion.from_pretrained(sd_path, scheduler="ddim")
    pipes: dict[str, Any] = {}
    if need_did:
        from dynamicid_jax.models.clip import load_image_encoder
        from dynamicid_jax.pipelines.dynamicid import DynamicIDPipeline, load_dynamicid

        encoder = dynamicid_image_encoder or os.path.join(dynamicid_path, "image_encoder")
        if not os.path.isdir(encoder):
            raise ValueError(f"no CLIP vision tower for DynamicID: {encoder!r} does not exist (give the image "
                             "encoder folder)")
        vision, vision_params = load_image_encoder(encoder)
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*-point analyzer.*")
            pipes["dynamicid"] = DynamicIDPipeline.from_weights(sd, load_dynamicid(dynamicid_path), vision,
                                                                vision_params, analyzer)
    if need_iid:
        from dynamicid_jax.pipelines.infinite_id import InfiniteIDPipeline

        encoder = infinite_id_image_encoder or os.path.join(infinite_id_path, "image_encoder")
        if not os.path.isdir(encoder):
            raise ValueError(f"no CLIP vision tower for Infinite-ID: {encoder!r} does not exist (give the image "
                             "encoder folder)")
        pipes["infinite-id"] = InfiniteIDPipeline.from_pretrained(sd, infinite_id_path, encoder,
                                                                  face_analyzer=analyzer)
    return pipes


def generate(method: str, pipes: dict[str, Any], request: Request, references: Sequence[np.ndarray], *,
             steps: int, guidance_scale: float) -> np.ndarray:
    """The images of one request by one method → ``uint8 [len(prompts), H, W, 3]``."""
    refs = [references[i] for i in request.refs]
    common = dict(steps=steps, guidance_scale=guidance_scale, seed=request.seed, height=request.height,
                  width=request.width)
    prompts = list(request.prompts)
    if method in INFINITE_ID_METHODS:
        if "infinite-id" not in pipes:
            raise ValueError(f"method {method} needs an Infinite-ID pipeline (pipes['infinite-id'])")
        return pipes["infinite-id"](prompts, references=refs, adain=method == "infinite-id", **common)
    if method not in ("dynamicid", "no-saa", "no-imr"):
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if "dynamicid" not in pipes:
        raise ValueError(f"method {method} needs a DynamicID pipeline (pipes['dynamicid'])")
    face_prompts = [request.face_prompt] if request.face_prompt and method != "no-imr" else None
    return pipes["dynamicid"](prompts, refs, face_prompts=face_prompts, layout="row",
                              activate_query=method != "no-saa", **common)


def run_method(method: str, pipes: dict[str, Any], requests: Sequence[Request], references: Sequence[np.ndarray],
               *, steps: int, guidance_scale: float) -> tuple[list[tuple[Request, np.ndarray]], float]:
    start = time.perf_counter()
    out = [(r, generate(method, pipes, r, references, steps=steps, guidance_scale=guidance_scale))
           for r in requests]
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------- scoring
def _strip_regions(boxes: Sequence[Sequence[float]], h: int, w: int) -> np.ndarray:
    return np.array([[x0 * w - 0.5, y0 * h - 0.5, x1 * w - 0.5, y1 * h - 0.5] for y0, x0, y1, x1 in boxes])


def _attr_acc(pred: dict[str, list], truth: dict[str, list]) -> dict[str, float | None]:
    return {k: M.accuracy(pred.get(k, [None] * len(v)), v) for k, v in truth.items() if len(v)}


def score_outputs(outputs: Sequence[tuple[Request, np.ndarray]], scorer, references: np.ndarray,
                  clip: M.ClipScorer | None = None) -> dict[str, Any]:
    """Every metric of one method's outputs (``references``: the evaluation embeddings ``[N, D]``)."""
    acc: dict[str, dict[str, list]] = {k: {"sim": [], "hit": []} for k in ("single", "multi", "edit", "control")}
    multi_mean, multi_min, placed = [], [], []
    attr_truth = {k: {"background": [], "clothing": [], "placement": []} for k in ("single", "multi")}
    attr_images: dict[str, list] = {"single": [], "multi": []}
    attr_regions: list = []
    face_jobs = []  # (request, image, box or None)
    clip_scores: dict[str, list] = {k: [] for k in acc}
    for request, images in outputs:
        dets = scorer.detect(list(images))
        refs = references[list(request.refs)]
        for b, (image, det) in enumerate(zip(images, dets)):
            match = M.match_faces(det, refs)
            a = acc[request.kind]
            a["sim"].extend(match.similarity.tolist())
            a["hit"].extend(match.matched.tolist())
            attrs = request.attributes[b] if request.attributes else None
            if request.kind == "multi":
                multi_mean.append(float(match.similarity.mean()))
                multi_min.append(float(match.similarity.min()))
                placed.extend(M.placed(match, det, np.asarray(request.boxes), image.shape[:2]).tolist())
                if attrs:
                    regions = _strip_regions(request.boxes, *image.shape[:2])
                    for r, region in enumerate(regions):
                        attr_images["multi"].append(image)
                        attr_regions.append(region)
                        attr_truth["multi"]["background"].append(attrs["background"])
                        attr_truth["multi"]["clothing"].append(attrs["clothing"][r])
            elif request.kind == "single" and attrs:
                attr_images["single"].append(image)
                for k in attr_truth["single"]:
                    attr_truth["single"][k].append(attrs[k])
            if request.kind == "edit":
                f = int(match.face[0])
                face_jobs.append((request, image, det.boxes[f] if f >= 0 else None,
                                  det.poses[f] if f >= 0 and det.poses is not None else None))
        if clip is not None:
            clip_scores[request.kind].extend(clip.score(list(images), list(request.prompts)).tolist())

    def sims(kind):
        a = acc[kind]
        sim, hit = np.asarray(a["sim"]), np.asarray(a["hit"], bool)
        return {"facesim": M.mean_or_none(sim), "facesim_detected": M.mean_or_none(sim[hit]),
                "detection_rate": M.mean_or_none(hit.astype(float)), "faces": int(len(sim))}

    out: dict[str, Any] = {}
    if acc["single"]["sim"]:
        out["single"] = {**sims("single"), "images": len(acc["single"]["sim"])}
        if attr_images["single"] and scorer.scene_classifier is not None:
            pred = scorer.scene_labels(attr_images["single"])
            per = _attr_acc(pred, attr_truth["single"])
            out["single"]["attributes"] = per
            out["single"]["attribute_accuracy"] = M.mean_or_none([v for v in per.values() if v is not None])
    if multi_mean:
        out["multi"] = {**sims("multi"), "images": len(multi_mean), "facesim_mean": float(np.mean(multi_mean)),
                        "facesim_min": float(np.mean(multi_min)), "placement": float(np.mean(placed))}
        del out["multi"]["facesim"]
        if attr_images["multi"] and scorer.scene_classifier is not None:
            pred = scorer.scene_labels(attr_images["multi"], np.asarray(attr_regions))
            truth = {k: v for k, v in attr_truth["multi"].items() if k != "placement"}
            per = _attr_acc(pred, truth)
            out["multi"]["attributes"] = per
            out["multi"]["attribute_accuracy"] = M.mean_or_none([v for v in per.values() if v is not None])
    if acc["edit"]["sim"]:
        out["edit"] = {**sims("edit"), "images": len(acc["edit"]["sim"]), **_edit_labels(scorer, face_jobs)}
        if acc["control"]["sim"]:
            control = sims("control")
            out["edit"]["facesim_unedited"] = control["facesim"]
            out["edit"]["facesim_drop"] = control["facesim"] - out["edit"]["facesim"]
    for kind, values in clip_scores.items():
        if values and kind in out:
            out[kind]["clip_t"] = float(np.mean(values))
    sets = [out[k].get("attribute_accuracy") for k in ("single", "multi") if k in out]
    sets = [v for v in sets if v is not None]
    out["attribute_accuracy"] = M.mean_or_none(sets)
    return out


def _edit_labels(scorer, jobs) -> dict[str, Any]:
    """Expr accuracy over requests with an expression, Pose accuracy over requests with a pose."""
    found = [j for j in jobs if j[2] is not None]
    labels: dict[str, list] = {"expression": [None] * len(jobs), "pose": [None] * len(jobs)}
    if found and scorer.face_classifier is not None:
        pred = scorer.face_labels([j[1] for j in found], np.stack([j[2] for j in found]))
        idx = [i for i, j in enumerate(jobs) if j[2] is not None]
        for head in ("expression", "pose"):
            for i, v in zip(idx, pred.get(head, [])):
                labels[head][i] = v
    elif found:  # real photos: only the view (front / side) from the analyzer's pose
        for i, j in enumerate(jobs):
            if j[3] is not None:
                labels["pose"][i] = M.view_of_pose(j[3])
    out: dict[str, Any] = {}
    for head, key in (("expression", "expression"), ("pose", "pose")):
        rows = [(labels[head][i], getattr(j[0], key)) for i, j in enumerate(jobs) if getattr(j[0], key)]
        if head == "expression" and scorer.face_classifier is None:
            out["expression_accuracy"] = None  # no expression classifier for real photos
            continue
        out[f"{head}_accuracy"] = M.accuracy([r[0] for r in rows], [r[1] for r in rows])
        per: dict[str, list] = {}
        for p, q in rows:
            per.setdefault(q, []).append(p == q)
        out[f"per_{head}"] = {q: float(np.mean(v)) for q, v in per.items()}
    return out


# ---------------------------------------------------------------------------------------------- the suite
def _load_rgb(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def synthface_baselines(data_dir: str, scorer: M.SynthFaceScorer, names: Sequence[str]) -> dict[str, Any]:
    """What real SynthFace images score (ceilings and the different-identity baseline) on ``names``' held-out
    images and on the data's group scenes of held-out people."""
    images, records = sf_data.load_split(data_dir, "heldout", names)
    is_ref = np.array([r["image"] == "neutral_front.png" for r in records])
    dets = scorer.detect(list(images))
    found = np.array([len(d) > 0 for d in dets])
    best = [d.embeddings[int(np.argmax(d.scores))] if len(d) else None for d in dets]
    ids = np.array([r["identity"] for r in records])
    keep_ref, keep = is_ref & found, ~is_ref & found
    out: dict[str, Any] = {"identities": list(names), "images": int(len(images)),
                           "detection_rate": float(found.mean())}
    if keep_ref.sum() >= 2 and keep.any():
        out.update(M.identity_baselines(np.stack([best[i] for i in np.flatnonzero(keep_ref)]), ids[keep_ref],
                                        np.stack([best[i] for i in np.flatnonzero(keep)]), ids[keep]))
    boxes = [d.boxes[int(np.argmax(d.scores))] if len(d) else None for d in dets]
    sel = [i for i in range(len(images)) if boxes[i] is not None]
    if sel and scorer.face_classifier is not None:
        pred = scorer.face_labels(images[sel], np.stack([boxes[i] for i in sel]))
        out["expression_accuracy"] = M.accuracy(pred["expression"], [records[i]["expression"] for i in sel])
        out["pose_accuracy"] = M.accuracy(pred["pose"], [records[i]["pose_name"] for i in sel])
    if scorer.scene_classifier is not None:
        pred = scorer.scene_labels(images)
        per = {k: M.accuracy(pred[k], [r["scene"][k] for r in records]) for k in ("background", "clothing",
                                                                                 "placement")}
        out["attributes"] = per
        out["attribute_accuracy"] = float(np.mean(list(per.values())))
    scenes = sf_data.load_index(data_dir).get("scenes", [])
    placed, hits = [], []
    for s in scenes:
        path = os.path.join(data_dir, s)
        rec = sf_data.read_record(path)
        ref_paths = [os.path.join(data_dir, f["reference"]) for f in rec["faces"]]
        if not all(os.path.isfile(p) for p in ref_paths):
            continue
        refs = M.reference_embeddings(scorer, [_load_rgb(p) for p in ref_paths], ref_paths,
                                      keypoints=[np.asarray(sf_data.read_record(p)["kps"]) for p in ref_paths])
        image = _load_rgb(path)
        (det,) = scorer.detect([image])
        match = M.match_faces(det, refs)
        placed.extend(M.placed(match, det, np.array([f["box"] for f in rec["faces"]]), image.shape[:2]).tolist())
        hits.extend(match.matched.tolist())
    if placed:
        out["scene_placement"] = float(np.mean(placed))
        out["scene_detection_rate"] = float(np.mean(hits))
        out["scene_faces"] = len(placed)
    return out


def synthface_targets(results: dict[str, Any], baselines: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets with pass / fail flags computed from the numbers (``None``: not measurable)."""
    def get(method, *keys):
        v = results.get(method)
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return v

    def target(name, rule, measured, passed):
        return {"target": name, "rule": rule, "measured": measured,
                "passed": None if passed is None else bool(passed)}

    out = []
    p = get("dynamicid", "multi", "placement")
    out.append(target("two-ID placement", "DynamicID multi-ID placement >= 0.90", {"placement": p},
                      None if p is None else p >= 0.9))
    e, d = get("dynamicid", "edit", "expression_accuracy"), get("dynamicid", "edit", "facesim_drop")
    out.append(target("IMR edits", "DynamicID expression accuracy >= 0.80 and FaceSim drop (unedited - edited) "
                      "<= 0.10", {"expression_accuracy": e, "facesim_drop": d},
                      None if e is None or d is None else e >= 0.8 and d <= 0.1))
    f = get("dynamicid", "single", "facesim")
    lo, hi = baselines.get("different_identity"), baselines.get("same_identity")
    bar = None if lo is None or hi is None else lo + 0.5 * (hi - lo)
    out.append(target("single-ID identity", "DynamicID single-ID FaceSim >= different-identity baseline + half "
                      "the gap to the same-identity ceiling", {"facesim": f, "bar": bar, "baseline": lo,
                                                               "ceiling": hi},
                      None if f is None or bar is None else f >= bar))
    n = get("no-imr", "edit", "expression_accuracy")
    out.append(target("ablation w/o IMR", "w/o IMR expression accuracy <= DynamicID's - 0.20 (Expr collapses)",
                      {"no-imr": n, "dynamicid": e}, None if n is None or e is None else n <= e - 0.2))
    sa, da = get("no-saa", "attribute_accuracy"), get("dynamicid", "attribute_accuracy")
    sp = get("no-saa", "multi", "placement")
    out.append(target("ablation w/o SAA", "w/o SAA prompt-attribute accuracy and multi-ID placement both below "
                      "DynamicID's", {"no-saa_attributes": sa, "dynamicid_attributes": da, "no-saa_placement": sp,
                                      "dynamicid_placement": p},
                      None if None in (sa, da, sp, p) else sa < da and sp < p))
    return out


def _enlarge(images: np.ndarray, k: int = 2) -> np.ndarray:
    return np.repeat(np.repeat(np.asarray(images, np.uint8), k, axis=-3), k, axis=-2)


def preview_grids(outputs: Sequence[tuple[Request, np.ndarray]], references: Sequence[np.ndarray]
                  ) -> dict[str, np.ndarray]:
    """``{"single"|"multi"|"edit": uint8 grid}``: a row per identity (pair) — reference(s), then its images;
    the edit row is reference, unedited control, then the first image of each edit."""
    from dynamicid_jax.image_io import image_grid

    def panel(refs, shape):  # the references side by side, resized to one generated image's size
        h, w = shape[:2]
        edges = np.linspace(0, w, len(refs) + 1).round().astype(int)
        return np.concatenate([np.asarray(Image.fromarray(np.asarray(references[i], np.uint8)).resize(
            (int(edges[k + 1] - edges[k]), h), Image.Resampling.BICUBIC)) for k, i in enumerate(refs)], axis=1)

    rows: dict[str, dict[Any, list]] = {"single": {}, "multi": {}, "edit": {}}
    for r, images in outputs:
        if r.kind in ("single", "multi"):
            rows[r.kind].setdefault(r.refs, [panel(r.refs, images[0].shape)]).extend(images)
        else:
            rows["edit"].setdefault(r.group, [panel(r.refs, images[0].shape)]).append(images[0])
    grids = {}
    for kind, by_row in rows.items():
        if not by_row:
            continue
        cols = max(len(v) for v in by_row.values())
        panels = []
        for v in by_row.values():
            panels += v + [np.full_like(v[0], 255)] * (cols - len(v))
        stack = np.stack(panels)
        grids[kind] = image_grid(_enlarge(stack) if stack.shape[1] < 128 else stack, columns=cols)
    return grids


def run_synthface(data_dir: str, models_dir: str, sd_path: str, *, dynamicid_path: str | None = None,
                  infinite_id_path: str | None = None, methods: Sequence[str] = METHODS,
                  protocol: Protocol = Protocol(), pipes: dict[str, Any] | None = None,
                  log=print) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Run the protocol for ``methods`` → ``(results, grids)``. ``results``: ``{"protocol", "baselines",
    "methods": {method: metrics}, "targets", "seconds"}``; ``grids``: ``{method: {kind: uint8 image}}``."""
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError("no methods to evaluate")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    index = sf_data.load_index(data_dir)
    names = list(index["splits"].get("heldout", []))
    if not names:
        raise ValueError(f"{data_dir!r} has no held-out identities to evaluate on")
    size = int(index["image_size"])
    seconds: dict[str, float] = {}
    t_all = start = time.perf_counter()
    scorer = M.SynthFaceScorer.from_models_dir(models_dir)
    if pipes is None:
        from dynamicid_jax.faces import get_analyzer

        analyzer = get_analyzer("synthetic", models_dir=models_dir, native_size=size)
        pipes = load_pipelines(methods, sd_path, dynamicid_path=dynamicid_path, infinite_id_path=infinite_id_path,
                               analyzer=analyzer)
    seconds["load"] = time.perf_counter() - start
    requests = synthface_requests(protocol, len(names), size)
    used = sorted({i for r in requests for i in r.refs})
    ref_paths = [os.path.join(data_dir, "heldout", names[i], "neutral_front.png") for i in range(max(used) + 1)]
    references = [_load_rgb(p) for p in ref_paths]
    ref_kps = [np.asarray(sf_data.read_record(p)["kps"], np.float64) for p in ref_paths]
    ref_emb = M.reference_embeddings(scorer, references, ref_paths, keypoints=ref_kps)  # renderer's exact keypoints
    start = time.perf_counter()
    baselines = synthface_baselines(data_dir, scorer, [names[i] for i in used] if len(used) >= 2 else names)
    seconds["baselines"] = time.perf_counter() - start
    results: dict[str, Any] = {}
    grids: dict[str, dict[str, np.ndarray]] = {}
    for method in methods:
        log(f"[eval] {method}: {len(requests)} calls, {sum(len(r.prompts) for r in requests)} images")
        outputs, gen_s = run_method(method, pipes, requests, references, steps=protocol.steps,
                                    guidance_scale=protocol.guidance_scale)
        t0 = time.perf_counter()
        results[method] = score_outputs(outputs, scorer, ref_emb)
        results[method]["seconds"] = {"generate": gen_s, "score": time.perf_counter() - t0}
        grids[method] = preview_grids(outputs, references)
        log(f"[eval] {method}: generated in {gen_s:.1f} s")
    seconds["total"] = time.perf_counter() - t_all
    counts = {k: sum(len(r.prompts) for r in requests if r.kind == k) for k in ("single", "multi", "edit",
                                                                                "control")}
    return {"suite": "synthface", "protocol": {**protocol.to_dict(), "image_size": size,
                                               "references": [names[i] for i in used], "images": counts,
                                               "calls": len(requests)},
            "baselines": baselines, "methods": results, "targets": synthface_targets(results, baselines),
            "seconds": seconds}, grids
