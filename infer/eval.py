"""Evaluate DynamicID, its ablations and Infinite-ID (docs/method.md §9): one table for all methods, JSON +
Markdown + grids.

    python -m infer.eval --suite synthface --data DATA --models MODELS --sd SD --dynamicid DIR \\
        [--infinite-id DIR] [--method dynamicid,no-saa,no-imr,base,infinite-id,infinite-id-no-adain] [--quick] \\
        --out OUT
    python -m infer.eval --suite real --model SD15 --dynamicid DIR --image-encoder CLIP-H [--infinite-id DIR] \\
        --clip CLIP-L --analyzer insightface --refs REFS_DIR --prompts prompts.txt --out OUT

Methods: ``dynamicid`` (SAA + IMR), ``no-saa`` (same weights, ``activate_query=False``), ``no-imr`` (same weights,
requests only in the text prompt), ``base`` (the SD base's own images, no identity: the generated-image chance
level), ``infinite-id`` and ``infinite-id-no-adain`` (AdaIN-mean off). Without ``--method`` every method whose
weights are given runs (``base`` with DynamicID). Writes into ``--out``: ``metrics.json`` (per method every metric
with its 95 % bootstrap interval and count, the baselines, the targets with pass / fail flags, the protocol's
sizing — no wall-clock times, so two runs give the same file), ``timings.json``, ``metrics.md`` (the table, the
baselines, the targets, the sizing) and ``{method}_single.png``, ``{method}_multi.png``, ``{method}_edit.png``.
What each number means: docs/evaluation.md.

**synthface** — the protocol of the SynthFace demo world (:mod:`synthface.evaluation.suite`) on the held-out
identities of a SynthFace tree, scored with its evaluation models (``--models``). It is not built in: the world
registers it (:mod:`dynamicid_jax.eval.suites`), as any other package can register a suite of its own; the
``synthface`` group of options (``--data``, ``--models``, ``--quick``, ``--steps``, ``--guidance-scale``,
``--id-scale``, ``--seed``) goes to whichever registered suite ``--suite`` names.

**real** — the same requests on real weights: every reference (one image per identity in ``--refs``, named by
file stem) × every prompt (``--prompts``, one per line); references paired left / right in one image; the first
reference × the 7 expressions of the automatic face prompt (front view). Faces are found and embedded by
``--analyzer`` (insightface / dlib) and compared in that backend's own metric (dlib: raw-descriptor Euclidean
distance, same person below 0.6 — the report gives the same-person rate, not a cosine); CLIP-T uses a CLIP
``CLIPModel`` folder (ViT-L/14) through our encoders. No expression classifier exists for real faces, so Expr is
not reported; Pose is the front-view rate of the edits.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dynamicid_jax.eval import runner as S
from dynamicid_jax.eval.scores import score_outputs
from dynamicid_jax.eval.suites import format_interval as _fmt_ci
from dynamicid_jax.eval.suites import format_value as _fmt
from dynamicid_jax.eval.suites import available_suites, get_suite

__all__ = ["run_eval", "run_real", "write_report", "markdown_report", "write_text_atomic", "main"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _default_methods(dynamicid: str | None, infinite_id: str | None) -> list[str]:
    methods = ["dynamicid", "no-saa", "no-imr", "base"] if dynamicid else []
    return methods + (list(S.INFINITE_ID_METHODS) if infinite_id else [])


def _parse_methods(methods: str | Sequence[str] | None, dynamicid: str | None, infinite_id: str | None) -> list[str]:
    if methods is None:
        chosen = _default_methods(dynamicid, infinite_id)
        if not chosen:
            raise ValueError("no weights given: pass --dynamicid DIR and/or --infinite-id DIR")
        return chosen
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.replace("|", ",").split(",") if m.strip()]
    unknown = [m for m in methods if m not in S.METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown or methods}; choose from {', '.join(S.METHODS)}")
    return list(dict.fromkeys(methods))


# ---------------------------------------------------------------------------------------------- real suite
def read_references(folder: str) -> tuple[list[str], list[np.ndarray]]:
    from dynamicid_jax.faces import load_rgb

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--refs {folder!r} is not a folder (expected one image per identity)")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"--refs {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ([os.path.splitext(f)[0] for f in files],
            [load_rgb(os.path.join(folder, f), f"reference {f}") for f in files])


def read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts {path!r} does not exist (expected a text file, one prompt per line)")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path!r} holds no prompts")
    return prompts


def real_requests(num_refs: int, prompts: Sequence[str], *, size: int, seed: int = 0, batch: int = 1,
                  multi_prompts: Sequence[str] | None = None) -> list[S.Request]:
    """single: each reference × each prompt; multi: references (0, 1), (2, 3), … left / right in one
    ``size²`` image with every prompt; edit: reference 0 × the 7 automatic-face-prompt expressions (front view)
    with the first prompt, plus its unedited control."""
    from dynamicid_jax.faces import EXPRESSIONS, auto_face_prompt
    from dynamicid_jax.methods.saa import layout_boxes

    def chunks(items):
        for i in range(0, len(items), batch):
            c = list(items[i:i + batch])
            yield c + [c[-1]] * (batch - len(c))

    out = []
    for r in range(num_refs):
        for c, chunk in enumerate(chunks(prompts)):
            out.append(S.Request("single", (r,), tuple(chunk), seed + 100 * r + c, size, size))
    boxes = tuple(tuple(float(v) for v in b) for b in layout_boxes(2, "row"))
    for k in range(num_refs // 2):
        for c, chunk in enumerate(chunks(list(multi_prompts or prompts))):
            out.append(S.Request("multi", (2 * k, 2 * k + 1), tuple(chunk), seed + 10_000 + 100 * k + c, size, size,
                                 boxes=boxes))
    out.append(S.Request("control", (0,), (prompts[0],) * batch, seed + 20_000, size, size))
    for e in EXPRESSIONS:
        face_prompt = auto_face_prompt((0.0, 0.0), e)
        out.append(S.Request("edit", (0,), (f"{prompts[0]}, {face_prompt}",) * batch, seed + 20_000, size, size,
                             face_prompt=face_prompt, expression=e, pose="front"))
    return out


def run_real(sd: str, *, refs: str, prompts: str, clip: str, methods: Sequence[str] | None = None,
             dynamicid: str | None = None, infinite_id: str | None = None, analyzer: Any = "insightface",
             input_analyzer: Any = "insightface", image_encoder: str | None = None,
             infinite_id_image_encoder: str | None = None, size: int = 512, steps: int = 30,
             guidance_scale: float = 5.0, id_scale: float = 1.0, seed: int = 0, batch: int = 1,
             multi_prompts: str | None = None, pipes: dict | None = None,
             log=_log) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """The real-weights suite → ``(results, grids)`` (see the module docstring)."""
    from dynamicid_jax.eval import metrics as M
    from dynamicid_jax.faces import get_analyzer

    methods = _parse_methods(methods, dynamicid, infinite_id)
    names, references = read_references(refs)
    prompt_list = read_prompts(prompts)
    multi_list = read_prompts(multi_prompts) if multi_prompts else prompt_list
    t_all = time.perf_counter()
    clip_scorer = M.ClipScorer.from_pretrained(clip)
    scorer = M.AnalyzerScorer(get_analyzer(analyzer) if isinstance(analyzer, str) else analyzer)
    if pipes is None:
        pipes = S.load_pipelines(methods, sd, dynamicid_path=dynamicid, infinite_id_path=infinite_id,
                                 analyzer=input_analyzer, dynamicid_image_encoder=image_encoder,
                                 infinite_id_image_encoder=infinite_id_image_encoder)
    ref_emb = M.reference_embeddings(scorer, references, names)
    baselines: dict[str, Any] = {"references": names, "metric": scorer.metric.to_dict()}
    if len(names) >= 2:  # in the analyzer's own metric (dlib: raw-descriptor distance, not a cosine)
        sim = scorer.metric.matrix(ref_emb, ref_emb)
        off = ~np.eye(len(names), dtype=bool)
        baselines["different_identity"] = float(sim[off].mean())
        baselines["note"] = (f"mean {scorer.metric.name} between different references (one image per identity: "
                             "no ceiling)")
        if scorer.metric.threshold is not None:
            baselines["different_identity_same_person_rate"] = float(scorer.metric.same(sim[off]).mean())
    requests = real_requests(len(names), prompt_list, size=size, seed=seed, batch=batch, multi_prompts=multi_list)
    results, grids = {}, {}
    for method in methods:
        log(f"[eval] {method}: {len(requests)} calls")
        outputs, gen_s = S.run_method(method, pipes, requests, references, steps=steps,
                                      guidance_scale=guidance_scale, id_scale=id_scale)
        t0 = time.perf_counter()
        results[method] = score_outputs(outputs, scorer, ref_emb, clip_scorer)
        results[method]["seconds"] = {"generate": gen_s, "score": time.perf_counter() - t0}
        grids[method] = S.preview_grids(outputs, references)
    counts = {k: sum(len(r.prompts) for r in requests if r.kind == k) for k in ("single", "multi", "edit", "control")}
    return {"suite": "real", "protocol": {"references": names, "prompts": prompt_list, "multi_prompts": multi_list,
                                          "size": size, "steps": steps,
                                          "guidance_scale": guidance_scale, "id_scale": id_scale, "seed": seed,
                                          "batch": batch,
                                          "images": counts, "calls": len(requests),
                                          "analyzer": getattr(scorer.analyzer, "name", str(analyzer))},
            "baselines": baselines, "methods": results, "targets": [],
            "seconds": {"total": time.perf_counter() - t_all}}, grids


# ------------------------------------------------------------------------------------------------ reporting
#: (title, path, interval?) — headline columns show "value [low, high]" (95 % bootstrap, see docs/evaluation.md)
COLUMNS = (("FaceSim", ("single", "facesim"), True), ("Same person", ("single", "same_person_rate"), True),
           ("Det.", ("single", "detection_rate"), False),
           ("Multi FaceSim L", ("multi", "facesim_left"), True), ("Multi FaceSim R", ("multi", "facesim_right"), True),
           ("Placement", ("multi", "placement"), True), ("Attr. acc", ("attribute_accuracy",), True),
           ("Expr", ("edit", "expression_accuracy"), True), ("Pose", ("edit", "pose_accuracy"), False),
           ("Δ FaceSim", ("edit", "facesim_drop"), True), ("CLIP-T", ("single", "clip_t"), False),
           ("Gen. s", ("seconds", "generate"), False))
METHOD_TITLES = {"dynamicid": "DynamicID", "no-saa": "w/o SAA", "no-imr": "w/o IMR", "base": "base (no ID)",
                 "infinite-id": "Infinite-ID", "infinite-id-no-adain": "Infinite-ID w/o AdaIN"}


def _get(d: Any, keys: Sequence[str]) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _ci_of(m: Any, keys: Sequence[str]) -> dict | None:
    if len(keys) == 1:
        return _get(m, (f"{keys[0]}_ci",))
    return _get(m, (*keys[:-1], "ci", keys[-1]))


def _cell(m: Any, keys: Sequence[str], with_ci: bool) -> str:
    ci = _ci_of(m, keys) if with_ci else None
    return _fmt_ci(ci) if ci else _fmt(_get(m, keys))


def _measured(v: Any) -> str:
    if isinstance(v, dict) and "estimate" in v:
        return _fmt_ci(v)
    return _fmt(v)


def markdown_report(results: dict[str, Any]) -> str:
    """One table for all methods (headline numbers with their 95 % intervals), the baselines, the targets
    (PASS / MISS with numbers and intervals) and the protocol's sizing."""
    suite = results["suite"]
    methods = results["methods"]
    cols = [c for c in COLUMNS if any(_get(m, c[1]) is not None for m in methods.values())]
    lines = [f"# Evaluation ({suite})", ""]
    p = results["protocol"]
    lines.append("Images per method: " + ", ".join(f"{k} {v}" for k, v in p["images"].items()) +
                 f"; {len(p['references'])} references: {', '.join(map(str, p['references']))}.")
    lines += ["", "| Method | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, m in methods.items():
        lines.append(f"| {METHOD_TITLES.get(method, method)} | " + " | ".join(_cell(m, k, ci) for _, k, ci in cols)
                     + " |")
    b = results["baselines"]
    registered = get_suite(suite) if suite != "real" else None
    if registered is not None and registered.markdown_baselines is not None:
        row, notes = registered.markdown_baselines(results, cols)
        if row is not None:
            title, values = row
            lines.append(f"| *{title}* | " + " | ".join(_cell(values, k, ci) for _, k, ci in cols) + " |")
        lines += notes
    else:
        lines += ["", "## Baselines", ""]
        for k, v in b.items():
            if k not in ("references",):
                lines.append(f"- {k}: {_fmt(v) if not isinstance(v, dict) else json.dumps(v, sort_keys=True)}")
    if results.get("targets"):
        lines += ["", "## Targets", ""]
        for t in results["targets"]:
            flag = {True: "PASS", False: "MISS", None: "not measured"}[t["passed"]]
            measured = "; ".join(f"{k} = {_measured(v)}" for k, v in t["measured"].items())
            lines.append(f"- **{flag}** — {t['target']}: {t['rule']}. Measured: {measured}")
    sizing = results.get("sizing")
    if sizing and sizing.get("metrics"):
        lines += ["", "## Protocol size", "", f"Rule: {sizing['rule']}. Measured on {sizing['method']}'s images:", "",
                  "| metric | units | per-unit sd | half-width | limit | units needed | enough |", "|---" * 7 + "|"]
        for name, r in sizing["metrics"].items():
            lines.append(f"| {name} | {r['units']} | {_fmt(r['sd'])} | {_fmt(r['half_width'])} | {r['limit']} | "
                         f"{r['units_needed']} | {'yes' if r['enough'] else 'no'} |")
    lines += ["", f"Total evaluation time: {results['seconds'].get('total', float('nan')):.1f} s."]
    return "\n".join(lines) + "\n"


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy scalars → Python, non-finite floats → None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (modes follow the umask)."""
    from dynamicid_jax.file_io import write_text

    write_text(text, path)


def split_timings(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(results without any "seconds", the seconds by method)``: wall-clock times differ between runs, so they go
    to ``timings.json`` and ``metrics.json`` stays identical across runs of the same models."""
    timings = {"total": results.get("seconds", {}), "methods": {}}
    clean = {k: v for k, v in results.items() if k != "seconds"}
    clean["methods"] = {}
    for method, m in results.get("methods", {}).items():
        clean["methods"][method] = {k: v for k, v in m.items() if k != "seconds"}
        if "seconds" in m:
            timings["methods"][method] = m["seconds"]
    return clean, timings


def write_report(out: str, results: dict[str, Any], grids: dict[str, dict[str, np.ndarray]]) -> dict[str, str]:
    """Write ``metrics.json`` (every number, no timings: identical across runs), ``timings.json``, ``metrics.md``
    and the grids into ``out`` (each file atomically); returns paths."""
    from dynamicid_jax.file_io import save_png

    os.makedirs(out, exist_ok=True)
    paths = {}
    for method, by_kind in grids.items():
        for kind, image in by_kind.items():
            paths[f"{method}_{kind}"] = save_png(image, os.path.join(out, f"{method}_{kind}.png"))
            os.chmod(paths[f"{method}_{kind}"], 0o644)
    results = _clean(results)
    metrics, timings = split_timings(results)
    for name, obj in (("metrics.json", metrics), ("timings.json", timings)):
        paths[name] = os.path.join(out, name)
        write_text_atomic(paths[name], json.dumps(obj, indent=1, sort_keys=True) + "\n")
    paths["metrics.md"] = os.path.join(out, "metrics.md")
    write_text_atomic(paths["metrics.md"], markdown_report(results))
    return paths


def run_eval(*, out: str, suite: str = "synthface", sd: str, methods: str | Sequence[str] | None = None,
             dynamicid: str | None = None, infinite_id: str | None = None, data: str | None = None,
             models: str | None = None, quick: bool = False, protocol: Any = None,
             pipes: dict | None = None, log=_log, **real_kwargs) -> dict[str, Any]:
    """Run a suite and write its report into ``out``; returns the results (what ``metrics.json`` holds).

    A registered suite (:func:`dynamicid_jax.eval.suites.get_suite`; ``synthface``: ``data`` a SynthFace tree,
    ``models`` its face models, ``protocol`` its Protocol, default the full one or the quick one with
    ``quick=True``). real: the keyword arguments of :func:`run_real` (``refs``, ``prompts``, ``clip``,
    ``analyzer``, …). ``pipes`` reuses loaded pipelines."""
    if suite != "real":
        registered = get_suite(suite)  # unknown → the registered names
        if real_kwargs:
            raise ValueError(f"options {sorted(real_kwargs)} belong to --suite real")
        chosen = _parse_methods(methods, dynamicid, infinite_id)
        results, grids = registered.run(sd=sd, methods=chosen, dynamicid=dynamicid, infinite_id=infinite_id,
                                        pipes=pipes, log=log, data=data, models=models, quick=quick,
                                        protocol=protocol)
    else:
        for key in ("refs", "prompts", "clip"):
            if not real_kwargs.get(key):
                raise ValueError(f"--suite real needs --{key}")
        results, grids = run_real(sd, methods=methods, dynamicid=dynamicid, infinite_id=infinite_id, pipes=pipes,
                                  log=log, **real_kwargs)
    write_report(out, results, grids)
    return _clean(results)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from dynamicid_jax.cli_args import nonnegative_float

    p.add_argument("--suite", default="synthface", help="real, or a registered suite (now: "
                   f"{', '.join(available_suites()) or 'none'}; the SynthFace demo world registers synthface)")
    p.add_argument("--sd", "--model", dest="sd", required=True, help="the Stable Diffusion base (diffusers folder "
                   "or single file)")
    p.add_argument("--dynamicid", help="a DynamicID folder (save_dynamicid / infer.convert / train.export_dynamicid)")
    p.add_argument("--infinite-id", help="an Infinite-ID weights folder (train.infinite_id export)")
    p.add_argument("--method", "--methods", dest="methods", help=f"comma-separated subset of {','.join(S.METHODS)} "
                   "(default: every method whose weights are given)")
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_argument_group("synthface")
    g.add_argument("--data", help="SynthFace folder (python -m synthface)")
    g.add_argument("--models", help="its face models (python -m synthface.train_models)")
    g.add_argument("--quick", action="store_true", help="the test-sized protocol (few images, 2 steps)")
    g.add_argument("--steps", type=int, help="denoising steps (synthface default 20, real 30)")
    g.add_argument("--guidance-scale", type=nonnegative_float, help="CFG scale (default 5.0)")
    g.add_argument("--id-scale", type=nonnegative_float,
                   help="the DynamicID methods' ID scale (synthface default 0.7, the protocol's; real 1.0)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--split", choices=("heldout", "validation"), default=None,
                   help="the references: the held-out identities (default; the report) or the validation ones "
                        "(python -m synthface --validation N: where a recipe is chosen without the held-out "
                        "identities)")
    r = p.add_argument_group("real")
    r.add_argument("--clip", help="CLIP ViT-L/14 folder (transformers CLIPModel) for CLIP-T")
    r.add_argument("--analyzer", default="insightface", choices=("insightface", "dlib"),
                   help="face analysis for scoring")
    r.add_argument("--input-analyzer", default="insightface", help="face analysis the methods consume")
    r.add_argument("--refs", help="folder with one reference image per identity")
    r.add_argument("--prompts", help="text file, one prompt per line")
    r.add_argument("--multi-prompts", help="prompts for the two-identity images (default: --prompts)")
    r.add_argument("--image-encoder", help="DynamicID's CLIP vision tower (default DYNAMICID/image_encoder)")
    r.add_argument("--infinite-id-image-encoder", help="Infinite-ID's CLIP vision tower (default "
                   "INFINITE_ID/image_encoder)")
    r.add_argument("--size", type=int, default=512)
    r.add_argument("--batch", type=int, default=1)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dynamicid_jax.file_io import check_writable

    check_writable(args.out, "--out", folder=True)  # before any model is loaded
    try:
        if args.suite != "real":
            overrides = {k: v for k, v in (("steps", args.steps), ("guidance_scale", args.guidance_scale),
                                           ("id_scale", args.id_scale), ("seed", args.seed), ("split", args.split))
                         if v is not None}
            results = run_eval(out=args.out, suite=args.suite, sd=args.sd, methods=args.methods,
                               dynamicid=args.dynamicid, infinite_id=args.infinite_id, data=args.data,
                               models=args.models, quick=args.quick, protocol=overrides or None)
        else:
            results = run_eval(out=args.out, suite="real", sd=args.sd, methods=args.methods,
                               dynamicid=args.dynamicid, infinite_id=args.infinite_id, refs=args.refs,
                               prompts=args.prompts, clip=args.clip, analyzer=args.analyzer,
                               input_analyzer=args.input_analyzer, image_encoder=args.image_encoder,
                               infinite_id_image_encoder=args.infinite_id_image_encoder, size=args.size,
                               steps=30 if args.steps is None else args.steps,
                               guidance_scale=5.0 if args.guidance_scale is None else args.guidance_scale,
                               id_scale=1.0 if args.id_scale is None else args.id_scale, seed=args.seed,
                               batch=args.batch, multi_prompts=args.multi_prompts)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(markdown_report(results))
    print(os.path.abspath(os.path.join(args.out, "metrics.json")))
    return 0


if __name__ == "__main__":
    from dynamicid_jax.errors import run_cli

    raise SystemExit(run_cli(main))
