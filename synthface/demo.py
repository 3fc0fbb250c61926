"""The embedded demo: DynamicID trained end to end on a CPU in SynthFace, then evaluated — no download.

    python -m synthface.demo --out demo_out [--quick] [--infinite-id] [--rebuild-base]

Stages (each recorded in ``{out}/work/stages.json`` and reused by the next run when its settings are unchanged;
the training stages also resume from their own checkpoints when interrupted):

1. SynthFace: training identities × 35 images, held-out identities, multi-person scenes;
2. the world's face models (input recogniser, evaluation recogniser, detector, landmarks, classifiers);
3. the SynthFace base: the shipped one (assets/synthface_base, checked against its provenance), or with
   ``--rebuild-base`` trained here by ``make base``'s code (``synthface.demo_base``); ``--quick``: a seconds-long one;
4. face-record shards of the training split (synthetic analyzer), each record with the base's VAE moments and the
   image encoder's features, so that the training stages need not run either frozen encoder per batch;
5. stage 1: ID encoder + SAA; 6. token cache + stage 2: IMR + KeyPointEncoder; then the DynamicID folder;
7. Infinite-ID (ID-semantics decoupled training) on the same base;
8. evaluation of DynamicID, its ablations and Infinite-ID on held-out identities;
9. figures and the real-photo face analysis.

Outputs in ``--out``: ``single_id.png``, ``multi_id.png``, ``edit.png``, ``gates.png``, ``metrics.json``,
``metrics.md``, ``timings.json`` (the evaluation's seconds; ``metrics.json`` has none, so it is identical across
runs), ``faces.png`` / ``faces.md`` (dlib on a real photo) and ``summary.json`` (per-stage seconds, diagnostics of
the ID tokens, the IMR's edits and the base's denoiser). See docs/demo.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

from dynamicid_jax.file_io import write_json, write_text
from synthface.demo_base import WORLD, WORLD_WORKERS
from synthface.demo_stages import Stage, StageRunner


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def face_section(out: str) -> dict:
    """Real face analysis with real offline weights (dlib) on the group photo shipped with insightface."""
    from PIL import Image, ImageDraw

    from dynamicid_jax.faces import auto_face_prompt, get_analyzer, identity_metric, identity_vector
    from dynamicid_jax.file_io import save_png
    from infer.eval import write_text_atomic
    from insightface.data import get_image

    image = np.ascontiguousarray(get_image("t1")[:, :, ::-1])  # insightface ships BGR
    analyzer = get_analyzer("dlib")
    start = time.perf_counter()
    faces = sorted(analyzer.analyze(image), key=lambda f: f.bbox[0])
    seconds = time.perf_counter() - start
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for i, face in enumerate(faces):
        x0, y0, x1, y1 = (float(v) for v in face.bbox)
        draw.rectangle([x0, y0, x1, y1], outline=(255, 64, 64), width=3)
        for x, y in face.kps:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(64, 255, 64))
        draw.text((x0 + 4, y0 + 4), str(i), fill=(255, 255, 0))
    save_png(np.asarray(canvas), os.path.join(out, "faces.png"))
    # identities in dlib's own metric: Euclidean distance of the raw 128-d descriptors, same person below 0.6 (their
    # cosines are 0.8-0.9 even between the six different people of this photo, so a cosine would say nothing)
    metric = identity_metric(analyzer)
    vectors = np.stack([identity_vector(f, metric) for f in faces])
    distance = metric.matrix(vectors, vectors)
    rows = ["| face | det score | pitch | yaw | roll | automatic face prompt |", "|---|---|---|---|---|---|"]
    for i, f in enumerate(faces):
        rows.append(f"| {i} | {f.det_score:.2f} | {f.pitch:+.1f} | {f.yaw:+.1f} | {f.roll:+.1f} | "
                    f"{auto_face_prompt(f.pose)} |")
    off_diag = ~np.eye(len(faces), dtype=bool)
    same = metric.same(distance) & off_diag
    table = ["| | " + " | ".join(map(str, range(len(faces)))) + " |", "|---" * (len(faces) + 1) + "|"]
    for i in range(len(faces)):
        table.append(f"| {i} | " + " | ".join(f"{distance[i, j]:.2f}" + (" (same)" if same[i, j] else "")
                                              for j in range(len(faces))) + " |")
    pairs = int(off_diag.sum() // 2)
    verdict = (f"{int(same.sum() // 2)} of {pairs} pairs of faces are judged the same person (all {len(faces)} "
               f"people in this photo are different, so the right answer is 0); smallest distance between two "
               f"different faces: {distance[off_diag].min():.2f}." if len(faces) > 1 else "")
    write_text_atomic(os.path.join(out, "faces.md"),
                      f"# Face analysis (dlib backend, real weights)\n\n{len(faces)} faces found in {seconds:.2f}s.\n\n"
                      + "\n".join(rows) + "\n\n## Identity: dlib's own metric\n\nEuclidean distance of the raw "
                      "128-d descriptors; dlib's rule: the same person below "
                      f"{metric.threshold}. {verdict}\n\n" + "\n".join(table) + "\n")
    return {"faces": len(faces), "analysis_s": seconds, "identity_metric": metric.name,
            "min_cross_identity_distance": float(distance[off_diag].min()) if len(faces) > 1 else None,
            "same_person_pairs": int(same.sum() // 2), "pairs": pairs}


#: The demo's settings. ``full`` is ``make demo`` (target: 15 minutes on 2 CPU cores; measured times in
#: docs/demo.md); ``quick`` is the test suite's end-to-end run (seconds per stage: it checks the wiring and the
#: files, not the method).
PRESETS: dict[str, dict] = {
    "full": {
        # the shipped base's world (synthface.demo_base.WORLD) without the pairs only the base trains on, with 60
        # more training identities than the base saw (for the face models and stage 1: with 120 identities stage 1
        # can train 2,500 steps without memorising them), plus validation identities (never trained on, never
        # reported: where a recipe is chosen; docs/demo.md)
        "synthface": {**{k: v for k, v in WORLD.items() if k != "pairs"}, "identities": 120, "validation": 16},
        "world_workers": WORLD_WORKERS,  # the world's 50 s → 26 s (docs/demo.md, What moved what)
        "face_models": {"steps_scale": 0.5},
        "base": "shipped", "stage1": [], "stage2": [], "infinite_id": [],
        "eval": {"quick": False},
        "figures": {"steps": 25, "guidance_scale": 4.0, "prompts": 3},
    },
    "quick": {
        "synthface": {"identities": 4, "heldout": 2, "scenes": 2, "pairs": 4, "size": 64, "seed": 0, "validation": 2},
        "world_workers": 1,
        "face_models": {"steps_scale": 0.15, "steps": {"image_encoder": 30}},  # its quality is not checked here
        "base": "quick",
        "stage1": ["train.steps=2", "checkpoint.every=2", "data.batch_size=2", "train.log_every=1"],
        "stage2": ["train.steps=2", "checkpoint.every=2", "data.num_targets=2", "train.log_every=1"],
        "infinite_id": ["train.steps=2", "checkpoint.every=2", "data.batch_size=2", "train.log_every=1"],
        "eval": {"quick": True},
        # the evaluation's batch (2) and steps (2): the figures reuse its compiled samplers
        "figures": {"steps": 2, "guidance_scale": 4.0, "prompts": 2},
    },
}

CONFIGS = {"stage0": "train/configs/synthface_stage0.yaml", "stage1": "train/configs/synthface_stage1.yaml",
           "stage2": "train/configs/synthface_stage2.yaml",
           "infinite_id": "train/configs/synthface_infinite_id.yaml"}
#: A stage folder without a finished record (an interrupted run) whose upstream stage was retrained since: start it
#: again instead of stopping with "trained with other inputs" (finished stages are removed by the runner).
RESTART = ("on_change=restart",)

#: Captions in SynthFace's own form: the base knows only the words and the sentence shape it was trained on (a
#: caption without the shirt and placement, like "a photo of a person, blue background", is out of its world).
FIGURE_PROMPTS = ("a photo of a person in a red shirt in the center, blue background",
                  "a photo of a person in a yellow shirt on the left, green background",
                  "a photo of a person in a white shirt on the right, orange background")
MULTI_PROMPTS = ("a photo of two people side by side, the person on the left wears a red shirt, the person on the "
                 "right wears a yellow shirt, blue background",
                 "a photo of two people side by side, the person on the left wears a white shirt, the person on the "
                 "right wears a black shirt, green background")


def _config_path(name: str) -> str:
    """The SynthFace config shipped with the package checkout (``train/configs/``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, CONFIGS[name])


def _config_settings(name: str) -> dict:
    """The config file's text as a stage setting: editing ``train/configs/synthface_*.yaml`` reruns its stage (and
    everything downstream) instead of reusing a result trained with the old file."""
    with open(_config_path(name), encoding="utf-8") as f:
        return {"config": f.read()}


def _one_device_mesh():
    """The demo trains on the first device, as stage 0 does by default: its batches are a few images, and several
    CPU "devices" (``--xla_force_host_platform_device_count``) would only share the same cores."""
    import jax

    from dynamicid_jax import sharding

    return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])


def build_stages(runner: StageRunner, preset: dict, *, infinite_id: bool, out: str,
                 rebuild_base: bool = False) -> tuple[list[Stage], str]:
    """The demo's stages (module docstring) with their settings, and the base's folder; ``runner.folder(name)`` is
    each stage's folder. The base: the shipped asset (checked against its provenance and the world), or with
    ``rebuild_base`` trained here by the same code as ``make base``; the quick preset trains a seconds-long one."""
    sf = preset["synthface"]
    data, models, shards = runner.folder("synthface"), runner.folder("face_models"), runner.folder("shards")
    stage0_dir, stage1_dir, stage2_dir = runner.folder("stage0"), runner.folder("stage1"), runner.folder("stage2")
    dynamicid_dir, iid_dir = runner.folder("dynamicid"), runner.folder("infinite_id")
    progress = True

    def synthface(folder):
        from synthface import generate

        index = generate(folder, sf["identities"], seed=sf["seed"], size=sf["size"], heldout=sf["heldout"],
                         scenes=sf["scenes"], pairs=sf.get("pairs", 0), validation=sf.get("validation", 0),
                         workers=preset["world_workers"], progress=progress)
        return {"train_identities": len(index["splits"]["train"]), "heldout": len(index["splits"]["heldout"]),
                "scenes": len(index["scenes"])}

    def face_models(folder):
        from synthface.train_models import train_all

        metrics = train_all(data, folder, steps_scale=preset["face_models"]["steps_scale"],
                            steps=preset["face_models"].get("steps"), progress=progress)
        return {k: metrics.get(k) for k in ("recognizer", "eval_recognizer", "face_classifier")}

    base_mode = "rebuild" if rebuild_base and preset["base"] == "shipped" else preset["base"]

    def base(folder):
        from synthface import demo_base

        if base_mode == "quick":
            from synthface import stage0 as s0

            return {"sd": s0.run(_config_path("stage0"), [f"data.root={data}"], workdir=folder, quick=True)}
        if base_mode == "rebuild":
            path = demo_base.build_base(os.path.join(folder, "asset"), os.path.join(folder, "build"),
                                        command="python -m synthface.demo --rebuild-base")
            provenance = demo_base.verify_base(path)
        else:
            path, provenance = demo_base.ASSET_DIR, demo_base.verify_base(demo_base.ASSET_DIR)
        return {"sd": path, "commit": provenance.get("commit"), **demo_base.check_world(provenance, data)}

    if base_mode == "quick":
        sd_path = os.path.join(stage0_dir, "export", "sd")
    elif base_mode == "rebuild":
        sd_path = os.path.join(stage0_dir, "asset")
    else:
        from synthface.demo_base import ASSET_DIR

        sd_path = ASSET_DIR
    base_settings = {"mode": base_mode}
    if base_mode == "shipped":
        import hashlib

        try:
            with open(os.path.join(sd_path, "provenance.json"), "rb") as f:
                base_settings["provenance_sha256"] = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            base_settings["provenance_sha256"] = None  # the stage reports the missing asset
    image_encoder = os.path.join(models, "image_encoder")

    def build(folder):
        # The base's VAE moments and the image encoder's features are stored with each record, so the training
        # stages read them instead of running both frozen encoders on every batch (the same inputs: the loaders
        # preprocess pixels exactly as the shard builder does; docs/demo.md, "What moved what").
        from data_pipelines.build_shards import build_shards

        manifest = build_shards(os.path.join(data, "train"), folder, "synthetic",
                                analyzer_kwargs={"models_dir": models}, resolution=sf["size"], latents=sd_path,
                                clip_vision=image_encoder, progress=progress)
        return {"records": int(manifest.num_records)}

    def stage1(folder):
        from train import stage1 as s1

        return {"export": s1.run(_config_path("stage1"), [f"model.base={sd_path}", f"data.shards={shards}",
                                                           f"model.image_encoder={image_encoder}",
                                                           *RESTART, *preset["stage1"]], workdir=folder,
                                 mesh=_one_device_mesh())}

    stage1_export = os.path.join(stage1_dir, "export", "stage1.safetensors")

    def stage2(folder):
        from train import stage2 as s2

        overrides = [f"model.base={sd_path}", f"data.shards={shards}", f"model.stage1={stage1_export}", *RESTART,
                     *preset["stage2"]]
        export = s2.run(_config_path("stage2"), overrides, workdir=folder, mesh=_one_device_mesh())
        from synthface.demo_diagnostics import token_variance_shares

        return {"export": export, "token_variance": token_variance_shares(os.path.join(folder, "token_cache"),
                                                                          shards)}

    def dynamicid(folder):
        from train.export_dynamicid import export_dynamicid

        export_dynamicid(stage1_export, os.path.join(stage2_dir, "export", "stage2.safetensors"), folder)
        return {"folder": folder}

    def infinite(folder):
        from train import infinite_id as ii

        return {"export": ii.run(_config_path("infinite_id"), [f"model.base={sd_path}", f"data.shards={shards}",
                                                                f"model.image_encoder={image_encoder}",
                                                                *RESTART, *preset["infinite_id"]], workdir=folder,
                                 mesh=_one_device_mesh())}

    iid_export = os.path.join(iid_dir, "export")

    def evaluate(folder):
        from infer.eval import run_eval

        results = run_eval(data=data, models=models, sd=sd_path, dynamicid=dynamicid_dir,
                           infinite_id=iid_export if infinite_id else None, out=folder,
                           quick=preset["eval"]["quick"], methods=methods)
        return {"methods": sorted(results.get("methods", {})) if isinstance(results, dict) else []}

    stages = [
        Stage("synthface", "SynthFace world", sf, synthface),
        Stage("face_models", "face models (recognisers, detector, landmarks, classifiers)",
              preset["face_models"], face_models, needs=("synthface",)),
        Stage("stage0", {"shipped": "the SynthFace base (shipped, checked against its provenance)",
                         "rebuild": "the SynthFace base, trained here (make base's recipe)",
                         "quick": "stage 0: a seconds-long base"}[base_mode], base_settings, base,
              needs=("synthface",)),
        Stage("shards", "face-record shards (synthetic analyzer; the base's VAE moments, image-encoder features)",
              {"size": sf["size"], "precomputed": ["vae_moments", "image_encoder_features"]}, build,
              needs=("synthface", "face_models", "stage0")),
        Stage("stage1", "stage 1: ID encoder + SAA", {"overrides": preset["stage1"], **_config_settings("stage1")},
              stage1,
              needs=("stage0", "shards", "face_models")),
        Stage("stage2", "stage 2: token cache, IMR + KeyPointEncoder",
              {"overrides": preset["stage2"], **_config_settings("stage2")}, stage2,
              needs=("stage1",)),
        Stage("dynamicid", "the DynamicID folder", {}, dynamicid, needs=("stage1", "stage2")),
    ]
    if infinite_id:
        stages.append(Stage("infinite_id", "Infinite-ID (ID-semantics decoupled training)",
                            {"overrides": preset["infinite_id"], **_config_settings("infinite_id")}, infinite,
                            needs=("stage0", "shards", "face_models")))
    from synthface.evaluation.suite import INFINITE_ID_METHODS, METHODS, Protocol

    methods = [m for m in METHODS if infinite_id or m not in INFINITE_ID_METHODS]
    protocol = Protocol.quick() if preset["eval"]["quick"] else Protocol()  # a changed protocol reruns the stage
    stages.append(Stage("eval", "evaluation on held-out identities",
                        {**preset["eval"], "methods": methods, "protocol": protocol.to_dict()},
                        evaluate, needs=tuple(s.name for s in stages if s.name in ("dynamicid", "infinite_id"))))
    return stages, sd_path


def _diagnostics(pipe, data: str, models: str, sd_path: str, summary: dict) -> dict:
    """What the ID tokens carry (stage 2's token cache), how different the IMR's seven edits are, whether the
    base's denoiser keeps an expression it is shown, and whether DynamicID draws its reference's expression
    (synthface/demo_diagnostics.py)."""
    from synthface.demo_diagnostics import (denoiser_expression_retention, edit_shift_similarity,
                                            expression_face_prompts, reference_expression_transfer)

    out = {"token_variance": summary.get("stage2", {}).get("result", {}).get("token_variance")}
    if pipe.imr is not None:
        out["edit_shifts"] = edit_shift_similarity(pipe, _held_out_references(data, 1)[0],
                                                   expression_face_prompts())
    out["denoiser_expression"] = denoiser_expression_retention(sd_path, models, data)
    from synthface.evaluation.suite import Protocol

    out["reference_expression"] = reference_expression_transfer(pipe, models, data, FIGURE_PROMPTS[0],
                                                                id_scale=Protocol.id_scale)
    return out


def _retention_steps(de: dict) -> str:
    return ", ".join(f"t = {t}: {v:.2f}" for t, v in de["one_step"].items())


#: metrics.md's line of each diagnostic (``_diagnostics``' keys), in this order
_DIAGNOSTIC_LINES = (
    ("token_variance", lambda tv: (
        f"Stage-1 ID tokens over {tv['records']} training images: {tv['between_identity']:.1%} of the variance lies "
        f"between identities; of the variance within an identity the expression explains "
        f"{tv['within_expression']:.1%}, the pose {tv['within_pose']:.1%}, the background colour "
        f"{tv['within_background']:.1%}.")),
    ("edit_shifts", lambda es: (
        f"IMR edits of one held-out reference towards the 7 expressions: token shifts of mean norm "
        f"{es['shift_norm_mean']:.2f} (tokens {es['token_norm']:.2f}), mean pairwise cosine "
        f"{es['mean_pairwise_cosine']:.3f} (1.0 = one shift whatever is asked). What the IMR is told: the base's "
        f"pooled text embeddings of the seven face prompts lie {es['text_spread']:.1%} of their norm apart (mean "
        f"pairwise distance), a prompt's seven clothing colours {es['colour_text_spread']:.1%}.")),
    ("denoiser_expression", lambda de: (
        f"The base's own denoiser on {de['images']} real front views of every expression, noised to t and denoised "
        f"in one step (caption and expression in the prompt): the expression classifier reads "
        f"{_retention_steps(de)}, against {de['round_trip']:.2f} after the VAE round trip alone (chance 0.14).")),
    ("reference_expression", lambda r: (
        f"DynamicID without an edit, given front views of every expression as references ({r['images']} images): "
        f"its faces show the reference's expression in {r['generated']:.2f} (chance 0.14; the classifier reads the "
        f"references themselves at {r['references']:.2f}) — the most an IMR edit can reach with these tokens on "
        f"this base.")),
)


def _diagnostics_md(d: dict) -> str:
    lines = ["", "## Diagnostics", ""] + [f"- {line(d[key])}" for key, line in _DIAGNOSTIC_LINES if d.get(key)]
    return "\n".join(lines) + "\n"


def _held_out_references(data: str, count: int) -> list[np.ndarray]:
    """Neutral frontal images of the first ``count`` held-out identities."""
    from PIL import Image

    from synthface import load_index

    names = sorted(load_index(data)["splits"]["heldout"])[:count]
    return [np.asarray(Image.open(os.path.join(data, "heldout", n, "neutral_front.png")).convert("RGB"))
            for n in names]


def run_demo(out: str, *, quick: bool = False, infinite_id: bool | None = None, rebuild_base: bool = False) -> dict:
    """Run (or reuse) every stage, then write the figures and the metrics into ``out``; returns the summary.

    ``infinite_id``: train and score Infinite-ID too (default: with ``quick`` only — in the full demo it is the
    ``--infinite-id`` option, because it does not fit the 15-minute budget beside DynamicID; see the README)."""
    if infinite_id is None:
        infinite_id = quick
    from dynamicid_jax.pipelines.dynamicid import DynamicIDPipeline
    from synthface.demo_figures import save_all

    preset = PRESETS["quick" if quick else "full"]
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    runner = StageRunner(os.path.join(out, "work"))
    stages, sd_path = build_stages(runner, preset, infinite_id=infinite_id, out=out, rebuild_base=rebuild_base)
    summary = runner.run(stages)
    _log("figures: single_id.png, multi_id.png, edit.png, gates.png")
    t0 = time.perf_counter()
    data, models = runner.folder("synthface"), runner.folder("face_models")
    with warnings.catch_warnings():  # SynthFace's IMR is trained on its own 68-point rasters
        warnings.filterwarnings("ignore", message="the IMR's landmark rasters come from a 68-point analyzer")
        pipe = DynamicIDPipeline.from_pretrained(sd_path, runner.folder("dynamicid"), analyzer="synthetic",
                                                 analyzer_kwargs={"models_dir": models})
    figure_settings = dict(preset["figures"])
    prompts = FIGURE_PROMPTS[:figure_settings.pop("prompts")]
    figures = save_all(pipe, _held_out_references(data, 2), prompts, MULTI_PROMPTS, out, **figure_settings)
    summary["figures"] = {"seconds": time.perf_counter() - t0, "result": figures}
    diagnostics = _diagnostics(pipe, data, models, sd_path, summary)
    for name in ("metrics.json", "metrics.md", "timings.json"):
        with open(os.path.join(runner.folder("eval"), name), encoding="utf-8") as f:
            text = f.read()
        write_text(text + _diagnostics_md(diagnostics) if name == "metrics.md" else text, os.path.join(out, name))
    t0 = time.perf_counter()
    summary["faces"] = {"result": face_section(out), "seconds": time.perf_counter() - t0}
    total = time.perf_counter() - start
    result = {"preset": "quick" if quick else "full", "base": sd_path, "rebuild_base": bool(rebuild_base),
              "total_s": total,
              "stages": {k: {"seconds": round(v["seconds"], 2), "reused": v.get("reused", False)}
                         for k, v in summary.items()},
              "faces": summary["faces"]["result"], "diagnostics": diagnostics,
              "gates": figures.get("gates", {})}  # where the gate sits (face box ÷ elsewhere), no layout boost
    write_json(result, os.path.join(out, "summary.json"))
    _log(f"demo done in {total:.0f} s → {os.path.abspath(out)}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m synthface.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps per stage (checks the wiring)")
    p.add_argument("--infinite-id", action=argparse.BooleanOptionalAction, default=None,
                   help="also train and score Infinite-ID (default: on with --quick, off in the full demo)")
    p.add_argument("--rebuild-base", action="store_true",
                   help="train the SynthFace base here (make base's recipe, ~40 min) instead of the shipped one")
    args = p.parse_args(argv)
    run_demo(args.out, quick=args.quick, infinite_id=args.infinite_id, rebuild_base=args.rebuild_base)
    return 0


if __name__ == "__main__":
    from dynamicid_jax.errors import run_cli

    raise SystemExit(run_cli(main))
