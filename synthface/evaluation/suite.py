"""The SynthFace evaluation protocol: held-out identities, prompts, seeds and scenes; the methods; the run.

**Requests** (:func:`synthface_requests`, deterministic from ``Protocol.seed``; every method gets the same
prompts, references and seeds, hence the same initial noise). ``n`` is the number of held-out identities in the
data index (all of them are used; nothing is hard-coded; ``Protocol.split = "validation"``: the validation
identities instead), each identity's reference its ``neutral_front`` image:

* ``single`` — about ``single_images`` images in all: each identity × ``⌈single_images / n⌉`` SynthFace captions
  (background, clothing, placement drawn like the data's; rounded up to whole batches of ``batch``);
* ``multi`` — the ``n`` identity pairs ``(k, k+1 mod n)`` (every identity once on the left, once on the right;
  ``n = 2``: both orders), about ``multi_images`` two-person images in all, each in the frame of the data's
  two-person scenes (``size × 2·size`` when the data has none), left/right layout boxes (SAA routes each identity
  to its box; the layout boost runs ``Protocol.multi_boost_steps`` steps, none by default) and a caption naming the
  background and each person's clothing and side;
* ``edit`` — the first ``m = min(n, ⌈edit_images / edit_batch⌉)`` identities × every expression in
  ``edit_expressions`` (front view; and every pose in ``edit_poses``, neutral) × ``⌈edit_images / m⌉`` images
  (whole batches of ``edit_batch``, one seed per batch): the KDEF-style face prompt ``"the expression is {e},
  the face is {p}"`` goes to the IMR (DynamicID) *and* is appended to the text prompt (all methods); only the
  ``edit_methods`` run them (no target reads w/o SAA's edits; the base's — the text alone asks for the expression,
  no identity — show whether the base can draw an expression it is asked for at all);
* ``control`` — per identity the same caption and seeds without any request: the unedited images each edit is
  paired with (same noise) for the FaceSim drop.

**Methods**: ``dynamicid`` (SAA + IMR; like its two ablations at ``Protocol.id_scale``), ``no-saa`` (same
weights, ``activate_query=False``), ``no-imr`` (same weights; requests only in the text — its single, multi and
control images are DynamicID's, which are not generated twice), ``base`` (the SD base's own text-to-image, no
identity: the generated-image chance level), ``infinite-id`` (two references are mixed, it has no layout) and
``infinite-id-no-adain`` (AdaIN-mean off).
Requests of one kind share one batch size, so each method compiles one program per image shape. Loading and
running the methods is the library's (:mod:`dynamicid_jax.eval.runner`, re-exported here).

**Scores**: :mod:`dynamicid_jax.eval.scores` (means, intervals), :mod:`.baselines` (real-image baselines),
:mod:`.scorer` (the world's evaluation models) and :mod:`.targets` (targets, sizing).
"""
from __future__ import annotations

import dataclasses
import math
import os
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from dynamicid_jax.eval import metrics as M
from dynamicid_jax.eval import scores as SC
from dynamicid_jax.eval.runner import (
    INFINITE_ID_METHODS,
    METHODS,
    Request,
    generate,
    load_pipelines,
    preview_grids,
    run_method,
)
from dynamicid_jax.eval.scores import score_outputs
from synthface import dataset as sf_data
from synthface import world
from synthface.background import BackgroundJob
from synthface.evaluation.baselines import synthface_baselines
from synthface.evaluation.scorer import SynthFaceScorer
from synthface.evaluation.targets import protocol_sizing, synthface_targets

__all__ = ["METHODS", "INFINITE_ID_METHODS", "Protocol", "Request", "synthface_requests",
           "load_pipelines", "generate", "run_method", "score_outputs", "synthface_baselines", "synthface_targets",
           "protocol_sizing", "preview_grids", "run_synthface"]

EDIT_EXPRESSIONS = world.EXPRESSIONS
#: the SynthFace splits whose identities can be the references (never the training identities)
REFERENCE_SPLITS = ("heldout", "validation")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Sizes of the SynthFace protocol (see the module docstring). :meth:`quick` is the test-sized one.

    The defaults are sized for the intervals the report promises (95 % half-width ≤ 0.05 for FaceSim, ≤ 0.10 for
    placement and Expr) by ``n ≥ (1.96·sd/h)²``: a rate needs ≥ 97 units in the worst case (``sd = 0.5``: 98
    edits per method, 96 two-person images), FaceSim's 96 images suffice up to a within-identity spread of 0.25;
    every run reports the sizing it achieved (``metrics.json`` → ``sizing``)."""

    single_images: int = 96
    multi_images: int = 96
    edit_images: int = 14
    edit_expressions: tuple[str, ...] = EDIT_EXPRESSIONS
    edit_poses: tuple[str, ...] = ()
    batch: int = 2  # one batch size for every kind: one compiled program per image shape and method (a
    edit_batch: int = 2  # compile costs 20-40 s on 2 busy cores, as much as ~100 generated images)
    steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0
    n_boot: int = 2000
    #: methods that also run the edits (and their controls). No target reads w/o SAA's edits; the base's are the
    #: text-only level of expression control (what the base draws when the prompt names the expression)
    edit_methods: tuple[str, ...] = ("dynamicid", "no-imr", "base", "infinite-id", "infinite-id-no-adain")
    #: methods that run the two-person requests (the quick protocol spares the base its two-person compile)
    multi_methods: tuple[str, ...] = METHODS
    #: the identities that are the references: ``"heldout"`` (the report) or ``"validation"`` (identities nothing
    #: trains on and the report never shows — where a recipe is chosen; ``python -m synthface --validation N``)
    split: str = "heldout"
    #: SAA's layout boost on the two-person requests, in denoising steps (None: the pipeline's default, s = 2 for 12
    #: steps). 0 — the gate and the routing only: the boxes are the two halves where the base draws its two people
    #: anyway, and on *training* identities every boost tried drew the faces worse (placement 0.71 without, 0.67 /
    #: 0.63 / 0.57 with 3 / 5 / 12 boosted steps of 20; docs/demo.md)
    multi_boost_steps: int | None = 0
    #: the DynamicID methods' ID scale (``DynamicIDPipeline(..., id_scale=)``: the ID tokens' attention output
    #: × this). 0.7, chosen on *validation* identities with two stage-1 seeds: two-person placement 0.92 / 0.80 at
    #: 1.0 → 0.95 / 0.84, single-ID FaceSim 0.56 / 0.52 → 0.54 / 0.53 (docs/demo.md, What moved what)
    id_scale: float = 0.7

    def __post_init__(self):
        for name in ("single_images", "batch", "edit_batch", "steps", "n_boot"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Protocol.{name} must be >= 1, got {getattr(self, name)!r}")
        if isinstance(self.id_scale, bool) or not isinstance(self.id_scale, (int, float)) \
                or not math.isfinite(self.id_scale) or self.id_scale <= 0:
            raise ValueError(f"Protocol.id_scale must be a number > 0, got {self.id_scale!r}")
        if self.split not in REFERENCE_SPLITS:
            raise ValueError(f"Protocol.split must be one of {', '.join(REFERENCE_SPLITS)}, got {self.split!r}")
        if self.multi_boost_steps is not None and (not isinstance(self.multi_boost_steps, int)
                                                   or self.multi_boost_steps < 0):
            raise ValueError(f"Protocol.multi_boost_steps must be None or an integer >= 0, got "
                             f"{self.multi_boost_steps!r}")
        for name in ("multi_images", "edit_images"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"Protocol.{name} must be >= 0, got {getattr(self, name)!r}")
        bad = [e for e in self.edit_expressions if e not in world.EXPRESSIONS]
        bad += [p for p in self.edit_poses if p not in world.POSES]
        if bad:
            raise ValueError(f"unknown edit expressions / poses {bad}; expressions {world.EXPRESSIONS}, poses "
                             f"{world.POSES}")
        object.__setattr__(self, "edit_expressions", tuple(self.edit_expressions))
        object.__setattr__(self, "edit_poses", tuple(self.edit_poses))
        object.__setattr__(self, "edit_methods", tuple(self.edit_methods))
        object.__setattr__(self, "multi_methods", tuple(self.multi_methods))

    @classmethod
    def quick(cls, **overrides) -> Protocol:
        """A few images per part and 2 denoising steps: checks that everything runs, not quality."""
        base = dict(single_images=4, multi_images=2, edit_images=2, edit_expressions=("neutral", "happy",
                                                                                       "surprised"),
                    edit_poses=(), batch=2, edit_batch=2, steps=2, n_boot=200, edit_methods=METHODS,
                    multi_methods=tuple(m for m in METHODS if m != "base"))
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["edit_expressions"], d["edit_poses"] = list(self.edit_expressions), list(self.edit_poses)
        d["edit_methods"], d["multi_methods"] = list(self.edit_methods), list(self.multi_methods)
        return d

    def per_identity(self, total: int, identities: int, batch: int) -> int:
        """Images per identity (or pair) for about ``total`` in all: ``⌈total / identities⌉`` in whole batches."""
        if total <= 0:
            return 0
        return int(math.ceil(math.ceil(total / identities) / batch) * batch)


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _chunks(items: Sequence, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _rng(seed: int, part: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), 9000 + part, int(index)]))


def multi_caption(clothing: Sequence[str], background: str) -> str:
    """The two-person caption: each person's clothing and side, the background (never who they are)."""
    return (f"a photo of two people side by side, the person on the left wears {_a(clothing[0])} shirt, the person "
            f"on the right wears {_a(clothing[1])} shirt, {background} background")


def identity_pairs(n: int) -> list[tuple[int, int]]:
    """``(k, k+1 mod n)`` for every ``k``: each identity once on the left and once on the right."""
    return [(k, (k + 1) % n) for k in range(n)] if n >= 2 else []


def synthface_requests(protocol: Protocol, num_references: int, size: int,
                       multi_size: tuple[int, int] | None = None) -> list[Request]:
    """Every request of the protocol for ``num_references`` held-out identities at ``size`` px (two-person
    images ``multi_size = (height, width)``, default ``(size, 2·size)``). Each part and identity draws its
    captions from its own generator, so changing one size leaves the other parts alone."""
    p = protocol
    n = int(num_references)
    if n < 1:
        raise ValueError("the SynthFace protocol needs at least one held-out identity")
    mh, mw = multi_size or (size, 2 * size)
    out: list[Request] = []
    per_id = p.per_identity(p.single_images, n, p.batch)
    for i in range(n):
        rng = _rng(p.seed, 0, i)
        scenes = [world.sample_scene(rng) for _ in range(per_id)]
        for c, chunk in enumerate(_chunks(scenes, p.batch)):
            out.append(Request("single", (i,), tuple(sf_data.caption_for(s.background, s.clothing, s.placement)
                                                     for s in chunk), p.seed + 100 * i + c, size, size,
                               attributes=tuple(s.to_dict() for s in chunk)))
    pairs = identity_pairs(n)
    per_pair = p.per_identity(p.multi_images, max(len(pairs), 1), p.batch)
    boxes = tuple(tuple(float(v) for v in b) for b in _layout(2))
    for k, pair in enumerate(pairs if per_pair else []):
        rng = _rng(p.seed, 1, k)
        scenes = []
        for _ in range(per_pair):
            background = list(world.BACKGROUNDS)[int(rng.integers(len(world.BACKGROUNDS)))]
            options = [c for c in world.CLOTHING if c != background]
            clothing = [options[int(rng.integers(len(options)))] for _ in pair]
            scenes.append({"background": background, "clothing": clothing})
        for c, chunk in enumerate(_chunks(scenes, p.batch)):
            out.append(Request("multi", pair, tuple(multi_caption(s["clothing"], s["background"]) for s in chunk),
                               p.seed + 10_000 + 100 * k + c, mh, mw, attributes=tuple(chunk), boxes=boxes,
                               boost_steps=p.multi_boost_steps))
    # edits: the first m identities, m = n unless fewer than a batch per identity would reach edit_images
    m = min(n, int(math.ceil(p.edit_images / p.edit_batch)))
    per_edit = p.per_identity(p.edit_images, m, p.edit_batch) if m else 0
    asks = [(x, "front", True) for x in p.edit_expressions] + [("neutral", q, False) for q in p.edit_poses]
    for e in range(m if per_edit and asks else 0):
        s = world.sample_scene(_rng(p.seed, 2, e))
        caption = sf_data.caption_for(s.background, s.clothing, s.placement)
        attrs = (s.to_dict(),) * p.edit_batch
        seeds = [p.seed + 20_000 + 100 * e + c for c in range(per_edit // p.edit_batch)]
        for seed in seeds:
            out.append(Request("control", (e,), (caption,) * p.edit_batch, seed, size, size, attributes=attrs,
                               group=e))
        for expression, pose, expression_edit in asks:
            face_prompt = world.grid_prompt(expression, pose)
            for seed in seeds:
                out.append(Request("edit", (e,), (f"{caption}, {face_prompt}",) * p.edit_batch, seed, size, size,
                                   face_prompt=face_prompt, expression=expression if expression_edit else None,
                                   pose=pose, attributes=attrs, group=e))
    return out


def _layout(n: int) -> np.ndarray:
    from dynamicid_jax.methods.saa import layout_boxes

    return layout_boxes(n, "row")


def _method_requests(method: str, requests: Sequence[Request], protocol: Protocol) -> list[Request]:
    return [r for r in requests if (method in protocol.edit_methods or r.kind not in ("edit", "control"))
            and (method in protocol.multi_methods or r.kind != "multi")]


def _lanes(methods: Sequence[str], cost: dict[str, float], workers: int) -> list[list[str]]:
    """Split the methods over ``workers`` lanes of about equal cost (largest first, each to the cheapest lane);
    w/o IMR stays right after DynamicID in DynamicID's lane, since it reuses DynamicID's images."""
    groups: list[list[str]] = []
    for m in methods:
        home = next((g for g in groups if g[0] == "dynamicid"), None) if m == "no-imr" else None
        if home is not None:
            home.append(m)
        else:
            groups.append([m])
    lanes: list[list[str]] = [[] for _ in range(max(1, min(workers, len(groups))))]
    loads = [0.0] * len(lanes)
    for g in sorted(groups, key=lambda g: -sum(cost[m] for m in g)):
        k = loads.index(min(loads))
        lanes[k] += g
        loads[k] += sum(cost[m] for m in g)
    return [lane for lane in lanes if lane]


def _generate_all(methods: Sequence[str], pipes: dict[str, Any], requests: Sequence[Request],
                  references: Sequence[np.ndarray], protocol: Protocol, *, workers: int, progress: bool,
                  log: Callable[[str], None]) -> dict[str, tuple[list[tuple[Request, np.ndarray]], float, bool]]:
    """Every method's images: ``{method: (outputs, generation seconds, reused DynamicID's images)}``.

    The methods run in ``workers`` threads (lanes): one sampling call keeps about one core busy on a CPU, so two
    lanes on two cores take ~0.6× the time. The images do not depend on the lanes (each request has its own seed;
    the compiled programs are the same), so ``metrics.json`` is identical for any ``workers``; a method's seconds
    are then measured while another method samples beside it."""
    mine = {m: _method_requests(m, requests, protocol) for m in methods}
    pixels = {m: sum(len(r.prompts) * r.height * r.width for r in mine[m]) for m in methods}
    cost = {m: pixels[m] * (0.2 if m == "no-imr" and "dynamicid" in methods else 1.0) for m in methods}
    out: dict[str, tuple[list[tuple[Request, np.ndarray]], float, bool]] = {}

    def lane(names: list[str]) -> None:
        for method in names:
            dynamicid = out.get("dynamicid")
            reuse = None
            if method == "no-imr" and dynamicid is not None and len(dynamicid[0]) == len(requests):
                reuse = {k: im for k, (r, im) in enumerate(dynamicid[0]) if r.kind != "edit"}
            todo = [r for k, r in enumerate(mine[method]) if reuse is None or k not in reuse]
            log(f"[eval] {method}: {len(todo)} calls, {sum(len(r.prompts) for r in todo)} images"
                + (" (single, multi and control images: DynamicID's)" if reuse else ""))
            outputs, gen_s = run_method(method, pipes, mine[method], references, steps=protocol.steps,
                                        guidance_scale=protocol.guidance_scale, id_scale=protocol.id_scale,
                                        reuse=reuse, progress=progress)
            out[method] = (outputs, gen_s, bool(reuse))
            log(f"[eval] {method}: generated in {gen_s:.1f} s")

    lanes = _lanes(methods, cost, workers)
    jobs = [BackgroundJob(functools.partial(lane, names)) for names in lanes[1:]]
    lane(lanes[0])
    for job in jobs:
        job.result()
    return out


def _load_rgb(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _multi_frame(data_dir: str, index: dict[str, Any], size: int) -> tuple[int, int]:
    """``(height, width)`` of the data's two-person scenes (the frame the base saw), else ``(size, 2·size)``."""
    for rel in index.get("scenes", []):
        path = os.path.join(data_dir, rel)
        try:
            if len(sf_data.read_record(path).get("faces", [])) == 2:
                with Image.open(path) as im:
                    return im.height, im.width
        except FileNotFoundError:
            continue
    return size, 2 * size


def run_synthface(data_dir: str, models_dir: str, sd_path: str, *, dynamicid_path: str | None = None,
                  infinite_id_path: str | None = None, methods: Sequence[str] = METHODS,
                  protocol: Protocol = Protocol(), pipes: dict[str, Any] | None = None,
                  log=print, progress: bool = True, workers: int = 2
                  ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Run the protocol for ``methods`` → ``(results, grids)``. ``results``: ``{"protocol", "baselines",
    "methods": {method: metrics}, "targets", "sizing", "seconds"}``; ``grids``: ``{method: {kind: image}}``.
    Every held-out identity of the data index is a reference; nothing depends on their number. ``workers``:
    methods sampled side by side (threads; the results do not depend on it)."""
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError("no methods to evaluate")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if "no-imr" in methods and "dynamicid" in methods:  # no-imr reuses DynamicID's images: run DynamicID first
        methods.remove("no-imr")
        methods.insert(methods.index("dynamicid") + 1, "no-imr")
    index = sf_data.load_index(data_dir)
    split = protocol.split
    names = list(index["splits"].get(split, []))
    if not names:
        raise ValueError(f"{data_dir!r} has no {split} identities to evaluate on"
                         + (" (generate them with python -m synthface --validation N)" if split == "validation"
                            else ""))
    size = int(index["image_size"])
    multi_size = _multi_frame(data_dir, index, size)
    seconds: dict[str, float] = {}
    t_all = start = time.perf_counter()
    scorer = SynthFaceScorer.from_models_dir(models_dir)
    if pipes is None:
        from dynamicid_jax.faces import get_analyzer

        analyzer = get_analyzer("synthetic", models_dir=models_dir, native_size=size)
        pipes = load_pipelines(methods, sd_path, dynamicid_path=dynamicid_path, infinite_id_path=infinite_id_path,
                               analyzer=analyzer)
    seconds["load"] = time.perf_counter() - start
    requests = synthface_requests(protocol, len(names), size, multi_size)
    ref_paths = [os.path.join(data_dir, split, n, "neutral_front.png") for n in names]
    references = [_load_rgb(p) for p in ref_paths]
    ref_kps = [np.asarray(sf_data.read_record(p)["kps"], np.float64) for p in ref_paths]
    ref_emb = M.reference_embeddings(scorer, references, ref_paths, keypoints=ref_kps)  # renderer's exact keypoints
    start = time.perf_counter()
    sd = pipes.get("sd")
    vae = (sd.vae, sd.params["vae"]) if sd is not None else None
    baselines = synthface_baselines(data_dir, scorer, names, ref_emb, vae=vae, seed=protocol.seed,
                                    n_boot=protocol.n_boot, split=split) if len(names) >= 2 else {"identities": names}
    seconds["baselines"] = time.perf_counter() - start
    results: dict[str, Any] = {}
    reps: dict[str, dict[str, np.ndarray]] = {}
    grids: dict[str, dict[str, np.ndarray]] = {}
    generated = _generate_all(methods, pipes, requests, references, protocol, workers=workers, progress=progress,
                              log=log)
    for method in methods:
        outputs, gen_s, reused = generated[method]
        t0 = time.perf_counter()
        samples = SC.collect_samples(outputs, scorer, ref_emb)
        results[method], reps[method] = SC.summarise(samples, scorer, seed=protocol.seed, n_boot=protocol.n_boot)
        results[method]["seconds"] = {"generate": gen_s, "score": time.perf_counter() - t0}
        if reused:
            results[method]["reused_from"] = "dynamicid"
        grids[method] = preview_grids(outputs, references)
    seconds["total"] = time.perf_counter() - t_all
    counts = {k: sum(len(r.prompts) for r in requests if r.kind == k) for k in ("single", "multi", "edit",
                                                                                "control")}
    return {"suite": "synthface", "protocol": {**protocol.to_dict(), "image_size": size,
                                               "multi_size": list(multi_size), "references": names,
                                               "identity_pairs": [list(p) for p in identity_pairs(len(names))],
                                               "images": counts, "calls": len(requests)},
            "baselines": baselines, "methods": results, "targets": synthface_targets(results, baselines, reps),
            "sizing": protocol_sizing(results), "seconds": seconds}, grids
