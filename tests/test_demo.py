"""`make demo` (python -m synthface.demo): the stage runner's reuse rules, and the quick preset end to end — SynthFace,
face models, shards, stage 0 → 1 → 2, Infinite-ID, evaluation, figures, real-photo face analysis — writing every
file. The quick preset trains each stage for a few steps: it checks the wiring and that every number is well
formed, and that the world's own models (recognisers, classifiers) are above chance; the method's quality is the
full demo's job (README, "Evaluation")."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from synthface.demo_stages import Stage, StageRunner

FILES = ("single_id.png", "multi_id.png", "edit.png", "gates.png", "metrics.json", "metrics.md", "faces.png",
         "faces.md", "summary.json")


def test_stage_runner_reuses_finished_stages_and_reruns_downstream(tmp_path):
    calls = []

    def make(name):
        def run(folder):
            calls.append(name)
            with open(f"{folder}/out.txt", "w") as f:
                f.write(name)
            return {"name": name}
        return run

    def stages(a_setting):
        return [Stage("a", "A", {"x": a_setting}, make("a")), Stage("b", "B", {}, make("b"), needs=("a",)),
                Stage("c", "C", {}, make("c"))]

    logs = []
    StageRunner(str(tmp_path), log=logs.append).run(stages(1))
    assert calls == ["a", "b", "c"]
    summary = StageRunner(str(tmp_path), log=logs.append).run(stages(1))
    assert calls == ["a", "b", "c"] and all(v["reused"] for v in summary.values())
    assert summary["b"]["result"] == {"name": "b"}
    StageRunner(str(tmp_path), log=logs.append).run(stages(2))  # a changed: a and b (downstream) again, c reused
    assert calls == ["a", "b", "c", "a", "b"]
    with pytest.raises(ValueError, match="needs"):
        StageRunner(str(tmp_path / "x")).run([Stage("b", "B", {}, make("b"), needs=("a",))])


def test_stage_runner_reruns_an_interrupted_stage(tmp_path):
    def boom(folder):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        StageRunner(str(tmp_path)).run([Stage("a", "A", {}, boom)])
    done = []
    StageRunner(str(tmp_path)).run([Stage("a", "A", {}, lambda folder: done.append(folder) or {})])
    assert len(done) == 1


def test_demo_stages_rerun_when_their_config_file_or_the_protocol_changes(tmp_path, monkeypatch):
    """A stage's settings hold its config file's text (and the evaluation's its protocol), so editing
    train/configs/synthface_stage1.yaml changes stage 1's fingerprint — and the stages downstream of it — instead of
    reusing a result trained with the old file."""
    import shutil

    from synthface import demo
    from synthface.demo_stages import fingerprint
    from synthface.evaluation.suite import Protocol

    configs = {}
    for name in demo.CONFIGS:
        configs[name] = tmp_path / f"{name}.yaml"
        shutil.copyfile(demo._config_path(name), configs[name])
    monkeypatch.setattr(demo, "_config_path", lambda name: str(configs[name]))

    def settings():
        stages, _ = demo.build_stages(StageRunner(str(tmp_path / "work")), demo.PRESETS["quick"], infinite_id=True,
                                      out=str(tmp_path / "out"))
        return {s.name: fingerprint(dict(s.settings)) for s in stages}, {s.name: s for s in stages}

    before, stages = settings()
    assert stages["eval"].settings["protocol"] == Protocol.quick().to_dict()
    configs["stage1"].write_text(configs["stage1"].read_text().replace("lr: 5.0e-4", "lr: 4.0e-4"))
    after, _ = settings()
    assert after["stage1"] != before["stage1"]
    assert {k for k in before if before[k] != after[k]} == {"stage1"}  # downstream reruns through `needs`


def test_quick_demo_writes_every_file(quick_demo):
    for name in FILES:
        assert (quick_demo / name).stat().st_size > 500, name
    for name in ("single_id.png", "multi_id.png", "edit.png", "gates.png"):
        image = np.asarray(Image.open(quick_demo / name))
        assert image.ndim == 3 and image.shape[0] > 64 and image.shape[1] > 64 and image.std() > 5, name
    summary = json.loads((quick_demo / "summary.json").read_text())
    assert summary["preset"] == "quick" and summary["total_s"] > 0
    for stage in ("synthface", "face_models", "shards", "stage0", "stage1", "stage2", "dynamicid", "infinite_id",
                  "eval", "figures", "faces"):
        assert stage in summary["stages"], stage
    work = quick_demo / "work"
    records = json.loads((work / "stages.json").read_text())
    assert set(records) >= {"stage0", "stage1", "stage2", "infinite_id", "eval"}
    assert (work / "stage0" / "export" / "sd" / "model_index.json").exists()
    assert (work / "dynamicid" / "image_encoder").is_dir()
    # the shards carry the base's VAE moments and the image encoder's features, which the training stages read
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    vae = json.loads((work / "stage0" / "export" / "sd" / "vae" / "config.json").read_text())
    encoder = json.loads((work / "face_models" / "image_encoder" / "config.json").read_text())
    assert manifest["latents"]["shape"][-1] == 2 * vae["latent_channels"] and manifest["latents"]["resolution"] == 64
    assert manifest["latents"]["source"] == str(work / "stage0" / "export" / "sd")
    assert manifest["clip_features"]["shape"][-1] == encoder["hidden_size"]


def test_quick_demo_metrics_are_well_formed(quick_demo):
    metrics = json.loads((quick_demo / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"dynamicid", "no-saa", "no-imr", "base", "infinite-id", "infinite-id-no-adain"}
    def numbers(tree, path=()):
        if isinstance(tree, dict):
            for k, v in tree.items():
                if k not in ("seconds", "sd"):  # sd: a spread, not a score
                    yield from numbers(v, path + (k,))
        elif isinstance(tree, float):
            yield path, tree

    found = list(numbers(metrics["methods"]))
    assert len(found) > 40
    for path, value in found:
        assert math.isfinite(value) and -1.0 <= value <= 1.0, (path, value)
    base = metrics["baselines"]
    # the world's evaluation models are above chance on held-out renders even at the quick preset's sizes
    assert base["detection_rate"] >= 0.9 and base["same_identity"] > base["different_identity"]
    assert base["attribute_accuracy"] > 1 / 3
    n = len(metrics["protocol"]["references"])
    assert base["different_pairs"] == n * (n - 1) // 2 == len(base["different_identity_pairs"])
    assert 0.0 <= base["expression_accuracy_round_trip"] <= 1.0
    for part, name in (("single", "facesim"), ("multi", "placement"), ("edit", "expression_accuracy")):
        ci = metrics["methods"]["dynamicid"][part]["ci"][name]
        assert ci["low"] - 1e-9 <= ci["estimate"] <= ci["high"] + 1e-9, (part, name, ci)
    assert len(metrics["targets"]) == 5 and all(isinstance(t["passed"], bool) for t in metrics["targets"])
    assert set(metrics["sizing"]["metrics"]) == {"single.facesim", "multi.placement", "edit.expression_accuracy"}
    assert "seconds" not in metrics and (quick_demo / "timings.json").is_file()  # metrics.json: no wall-clock
    report = (quick_demo / "metrics.md").read_text()
    assert "| DynamicID |" in report and "| Infinite-ID |" in report and "| base (no ID) |" in report
    assert "| Infinite-ID w/o AdaIN |" in report and "## Targets" in report and "## Protocol size" in report


def test_quick_demo_diagnoses_where_expression_is_lost(quick_demo):
    """The summary and metrics.md carry the expression diagnostics: the base denoiser's one-step estimates of every
    held-out front view at the four timesteps beside the VAE round trip, the base's text-only edits, and DynamicID
    given each held-out front view as its reference (one image each, scored against the reference's expression)."""
    from synthface import load_index
    from synthface.world import EXPRESSIONS

    summary = json.loads((quick_demo / "summary.json").read_text())
    d = summary["diagnostics"]["denoiser_expression"]
    held_out = load_index(str(quick_demo / "work" / "synthface"))["splits"]["heldout"]
    assert d["split"] == "heldout" and d["images"] == 7 * len(held_out)  # one front view per expression
    assert list(d["one_step"]) == ["50", "150", "300", "500"]
    for value in [d["round_trip"], *d["one_step"].values()]:
        assert 0.0 <= value <= 1.0 and abs(value * d["images"] - round(value * d["images"])) < 1e-6  # a share
    assert "The base's own denoiser on" in (quick_demo / "metrics.md").read_text()
    r = summary["diagnostics"]["reference_expression"]
    assert r["split"] == "heldout" and r["images"] == 7 * min(8, len(held_out))
    assert sum(r["labels"].values()) == r["images"] and set(r["labels"]) <= set(EXPRESSIONS)
    for value in (r["references"], r["generated"]):
        assert 0.0 <= value <= 1.0 and abs(value * r["images"] - round(value * r["images"])) < 1e-6
    assert "DynamicID without an edit, given front views" in (quick_demo / "metrics.md").read_text()
    metrics = json.loads((quick_demo / "metrics.json").read_text())
    assert "expression_accuracy" in metrics["methods"]["base"]["edit"]


def test_quick_demo_reports_what_the_imr_is_told(quick_demo):
    """The edit diagnostic carries the spread of the IMR's text input: the base's pooled text embeddings of the seven
    face prompts, mean pairwise distance relative to their norm (0 for seven copies of one prompt), beside the same
    for seven clothing colours; fewer than two prompts is a one-line error."""
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion
    from synthface.demo_diagnostics import COLOUR_PROMPTS, pooled_text_spread

    summary = json.loads((quick_demo / "summary.json").read_text())
    es = summary["diagnostics"]["edit_shifts"]
    assert len(es["prompts"]) == 7 and es["text_spread"] > 0 and es["colour_text_spread"] > 0
    assert "What the IMR is told" in (quick_demo / "metrics.md").read_text()
    sd = StableDiffusion.from_pretrained(summary["base"], scheduler="ddim")
    assert pooled_text_spread(sd, es["prompts"]) == pytest.approx(es["text_spread"], rel=1e-5)
    assert pooled_text_spread(sd, [COLOUR_PROMPTS[0]] * 3) == 0.0
    with pytest.raises(ValueError, match="at least two texts to compare, got 1"):
        pooled_text_spread(sd, COLOUR_PROMPTS[:1])


def test_reference_expression_transfer_rejects_bad_arguments(quick_demo):
    """An unknown split or a non-positive identity count is a one-line error naming it, before anything is sampled."""
    from synthface.demo_diagnostics import reference_expression_transfer

    work = quick_demo / "work"
    args = (None, str(work / "face_models"), str(work / "synthface"), "a photo of a person")
    with pytest.raises(ValueError, match=r"split must be one of .*got 'nope'"):
        reference_expression_transfer(*args, split="nope")
    with pytest.raises(ValueError, match="identities must be a positive integer, got 0"):
        reference_expression_transfer(*args, identities=0)


def test_quick_demo_real_face_analysis(quick_demo):
    """dlib compares identities by the Euclidean distance of its raw descriptors (same person below 0.6): the six
    different people of the group photo are all judged different."""
    summary = json.loads((quick_demo / "summary.json").read_text())
    faces = summary["faces"]
    assert faces["faces"] == 6 and faces["pairs"] == 15 and faces["same_person_pairs"] == 0
    assert faces["min_cross_identity_distance"] > 0.6
    report = (quick_demo / "faces.md").read_text()
    assert report.count("in a neutral expression") == 6 and "Euclidean distance" in report and "(same)" not in report
