"""Bad inputs through the command lines: each is a clear, one-line error, nothing is written at any output path,
and no existing file changes (the library's cases: tests/test_bad_inputs_library.py; the world both read:
tests/bad_input_env.py).

Every command-line case runs ``run_cli(main, argv)`` in this process (the same code path as ``python -m …``, minus
the interpreter start) and checks the exit status, that the error is one line naming the input and what was
expected, that no traceback is printed, that no output path appeared and that the data folder (a user's notes,
a model folder, images, shards) is byte-for-byte unchanged. The cases stop before any model is compiled, except
the Ctrl-C case, which samples the tiny model in chunks and interrupts it. Also: files we write follow the umask,
``--overwrite`` replaces only our own folders, the deprecated flag spellings still work and ``--debug`` shows the
traceback.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import Callable

import numpy as np
import pytest

from dynamicid_jax.errors import run_cli

from bad_input_env import make_env, tree_digest, write_shards


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_sd_dir):
    """The data folder every case must leave untouched, and the paths the cases point at (tests/bad_input_env.py)."""
    return make_env(tmp_path_factory.mktemp("bad_inputs"), tiny_sd_dir)


# ---------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    command: str  # module whose main runs: "infer.generate", …
    argv: Callable[[dict], list[str]]
    code: int
    expect: tuple[str, ...]  # substrings of the error line: the input and what was expected
    outputs: Callable[[dict], list[str]] = lambda e: []  # paths that must not exist afterwards


def _gen(*extra: str, out: str = "x.png"):
    return lambda e: ["--model", e["model"], "--prompt", "a cat", "--height", "64", "--width", "64",
                      "--out", os.path.join(e["out"], out), *[a.format(**e) for a in extra]]


def _out(name: str = "x.png"):
    return lambda e: [os.path.join(e["out"], name)]


D = "{data}"
GEN = "infer.generate"
DYN = ("--dynamicid", D, "--reference", D + "/face.png")
CLI_CASES = [
    # numbers (argparse: exit 2)
    Case("guidance-nan", GEN, _gen("--guidance-scale", "nan"), 2, ("--guidance-scale", "finite", "'nan'"), _out()),
    Case("guidance-inf", GEN, _gen("--guidance-scale", "inf"), 2, ("--guidance-scale", "finite", "'inf'"), _out()),
    Case("guidance-negative", GEN, _gen("--guidance-scale", "-1"), 2, ("--guidance-scale", ">= 0"), _out()),
    Case("guidance-text", GEN, _gen("--guidance-scale", "high"), 2, ("--guidance-scale", "a number", "'high'"), _out()),
    Case("id-scale-nan", GEN, _gen(*DYN, "--id-scale", "nan"), 2,
         ("--id-scale", "finite"), _out()),
    Case("mix-inf", GEN, _gen(*DYN, "--mix", "inf"), 2,
         ("--mix", "finite"), _out()),
    Case("boost-negative", GEN, _gen(*DYN,
                                                  "--boost-strength", "-2"), 2, ("--boost-strength", ">= 0"), _out()),
    Case("steps-zero", GEN, _gen("--steps", "0"), 2, ("--steps", "positive integer", "'0'"), _out()),
    Case("steps-text", GEN, _gen("--steps", "many"), 2, ("--steps", "positive integer"), _out()),
    Case("height-negative", GEN, _gen("--height", "-64"), 2, ("--height", "positive integer"), _out()),
    Case("boxes-three-values", GEN, _gen(*DYN, "--boxes", "0,0,1"), 2,
         ("--boxes", "y0,x0,y1,x1", "'0,0,1'"), _out()),
    Case("layout-words", GEN, _gen(*DYN, "--layout", "a,b"), 2,
         ("--layout", "'row', 'grid'", "'a,b'"), _out()),
    Case("scheduler-unknown", GEN, _gen("--scheduler", "pndm"), 2, ("--scheduler", "'pndm'"), _out()),
    # options of the wrong method (exit 2)
    Case("reference-without-method", GEN, _gen("--reference", D + "/face.png"), 2,
         ("--reference", "needs an identity method"), _out()),
    Case("deprecated-ref-without-method", GEN, _gen("--ref", D + "/face.png"), 2,
         ("--reference", "needs an identity method"), _out()),
    Case("boxes-with-infinite-id", GEN, _gen("--method", "infinite-id", "--boxes", "0,0,1,1"), 2,
         ("--boxes", "belong to DynamicID"), _out()),
    Case("face-prompts-count", GEN, _gen(*DYN,
                                                      "--face-prompt", "a", "--face-prompt", "b"), 2,
         ("--face-prompt", "2 time(s) for 1 --reference"), _out()),
    Case("dynamicid-without-reference", GEN, _gen("--dynamicid", D), 2,
         ("--dynamicid", "--reference"), _out()),
    # paths, checked before loading anything (exit 1)
    Case("out-is-folder", GEN, lambda e: _gen(out="")(e)[:-1] + [e["out"]], 1,
         ("--out", "is a folder", "file path")),
    Case("out-under-file", GEN, _gen(out="../data/a_file/x.png"), 1, ("--out", "which is a file")),
    Case("reference-missing", GEN, _gen("--dynamicid", D, "--reference", D + "/nobody.png"), 1,
         ("--reference", "nobody.png", "no such image file"), _out()),
    Case("reference-is-folder", GEN, _gen("--dynamicid", D, "--reference", D), 1,
         ("--reference", "is a folder"), _out()),
    Case("save-gates-under-file", GEN, _gen(*DYN,
                                                         "--save-gates", D + "/a_file/g.png"), 1,
         ("--save-gates", "which is a file"), _out()),
    Case("text-stream-under-file", GEN, _gen("--method", "infinite-id", "--reference", D + "/face.png",
                                                          "--infinite-id-weights", D, "--image-encoder", D,
                                                          "--save-text-stream", D + "/a_file/t.png"), 1,
         ("--save-text-stream", "which is a file"), _out()),
    Case("infinite-id-missing-weights", GEN, _gen("--method", "infinite-id", "--reference", D + "/face.png"), 1,
         ("--method infinite-id needs", "--infinite-id-weights", "--image-encoder"), _out()),
    # models
    Case("model-missing", GEN, lambda e: ["--model", e["data"] + "/no_model", "--prompt", "a",
                                                       "--out", e["out"] + "/x.png"], 1, ("no_model",), _out()),
    Case("model-hub-id", GEN, lambda e: ["--model", "runwayml/stable-diffusion-v1-5", "--prompt", "a",
                                                      "--out", e["out"] + "/x.png"], 1,
         ("runwayml/stable-diffusion-v1-5",), _out()),
    Case("model-ckpt", GEN, lambda e: ["--model", e["data"] + "/model.ckpt", "--prompt", "a",
                                                    "--out", e["out"] + "/x.png"], 1,
         ("model.ckpt", ".safetensors"), _out()),
    Case("model-not-sd", GEN, lambda e: ["--model", e["data"] + "/not_sd", "--prompt", "a",
                                                      "--out", e["out"] + "/x.png"], 1,
         ("not_sd", "missing unet/"), _out()),
    # after loading the tiny model, before compiling
    Case("steps-1000", GEN, _gen("--steps", "1000"), 1, ("num_inference_steps=1000", "expected 1..999"), _out()),
    Case("size-4096", GEN, _gen("--height", "4096", "--width", "4096"), 1,
         ("4096×4096", "needs about", "more than"), _out()),
    Case("height-not-multiple", GEN, _gen("--height", "50"), 1, ("height", "multiple of", "50"), _out()),
    Case("dynamicid-not-converted", GEN, _gen("--dynamicid", D + "/not_sd", "--reference", D + "/face.png",
                                                           "--image-encoder", D), 1,
         ("not_sd", "not a converted DynamicID folder", "infer.convert"), _out()),
    # convert: --overwrite never deletes what we did not write
    Case("convert-overwrite-user-folder", "infer.convert", lambda e: [
        "--saa", e["data"] + "/model.ckpt", "--unet-config", "sd15", "--out", e["data"] + "/my-sd-copy",
        "--overwrite"], 1,
        ("--overwrite refused", "my-sd-copy", "not a converted DynamicID folder")),
    Case("convert-overwrite-file", "infer.convert", lambda e: [
        "--saa", e["data"] + "/model.ckpt", "--unet-config", "sd15", "--out", e["data"] + "/notes.txt",
        "--overwrite"], 1,
        ("--overwrite refused", "notes.txt")),
    Case("convert-exists", "infer.convert", lambda e: [
        "--saa", e["data"] + "/model.ckpt", "--unet-config", "sd15", "--out", e["data"] + "/not_sd"], 1,
        ("not_sd", "already exists", "--overwrite")),
    Case("convert-saa-missing", "infer.convert", lambda e: [
        "--saa", e["data"] + "/SAA.bin", "--unet-config", "sd15", "--out", e["out"] + "/conv"], 1, ("SAA.bin",),
        lambda e: [e["out"] + "/conv"]),
    Case("convert-kpe-without-imr", "infer.convert", lambda e: [
        "--saa", e["data"] + "/model.ckpt", "--key-point-encoder", e["data"] + "/model.ckpt", "--unet-config", "sd15",
        "--out", e["out"] + "/conv"], 1, ("--key-point-encoder", "--imr"), lambda e: [e["out"] + "/conv"]),
    Case("convert-unet-config-txt", "infer.convert", lambda e: [
        "--saa", e["data"] + "/model.ckpt", "--unet-config", e["data"] + "/notes.txt", "--out", e["out"] + "/conv"], 1,
        ("--unet-config", "notes.txt", "config.json"), lambda e: [e["out"] + "/conv"]),
    Case("convert-out-under-file", "infer.convert", lambda e: [
        "--saa", e["data"] + "/model.ckpt", "--unet-config", "sd15", "--out", e["data"] + "/a_file/conv"], 1,
        ("--out", "which is a file")),
    # configs: refused on load, before any workdir is touched
    Case("config-ema-text", "train.stage1", lambda e: ["workdir=" + e["out"] + "/w", "train.ema_decay=fast"], 1,
         ("train.ema_decay", "[0, 1)", "'fast'"), lambda e: [e["out"] + "/w"]),
    Case("config-ema-one", "train.stage1", lambda e: ["workdir=" + e["out"] + "/w", "train.ema_decay=1.0"], 1,
         ("train.ema_decay", "[0, 1)"), lambda e: [e["out"] + "/w"]),
    Case("config-remat", "train.stage1", lambda e: ["workdir=" + e["out"] + "/w", "model.remat=fast"], 1,
         ("model.remat", "dots"), lambda e: [e["out"] + "/w"]),
    Case("config-lr-zero", "train.stage1", lambda e: ["workdir=" + e["out"] + "/w", "optimizer.lr=0"], 1,
         ("optimizer.lr", "> 0"), lambda e: [e["out"] + "/w"]),
    Case("config-lr-nan", "train.stage2", lambda e: ["workdir=" + e["out"] + "/w", "optimizer.lr=.nan"], 1,
         ("optimizer.lr", "finite"), lambda e: [e["out"] + "/w"]),
    Case("config-batch-zero", "train.stage1", lambda e: ["workdir=" + e["out"] + "/w", "data.batch_size=0"], 1,
         ("data.batch_size", ">= 1"), lambda e: [e["out"] + "/w"]),
    Case("config-typo", "train.stage1", lambda e: ["workdir=" + e["out"] + "/w", "train.stepz=3"], 1,
         ("train.stepz", "did you mean", "steps"), lambda e: [e["out"] + "/w"]),
    Case("config-on-change", "train.infinite_id", lambda e: ["workdir=" + e["out"] + "/w", "on_change=maybe"], 1,
         ("on_change", "'error', 'restart'"), lambda e: [e["out"] + "/w"]),
    Case("config-corrupt-fraction", "train.stage1", lambda e: ["workdir=" + e["out"] + "/w",
                                                               "data.max_corrupt_fraction=2"], 1,
         ("data.max_corrupt_fraction", "[0.0, 1.0]"), lambda e: [e["out"] + "/w"]),
    Case("synthface-workers-zero", "synthface.__main__", lambda e: [
        "--out", e["out"] + "/world", "--identities", "2", "--workers", "0", "--quiet"], 1, ("workers", ">= 1", "0"),
        lambda e: [e["out"] + "/world"]),
    Case("config-file-missing", "train.stage1", lambda e: ["--config", e["data"] + "/nope.yaml"], 1,
         ("nope.yaml", "does not exist")),
    Case("config-file-list", "train.stage1", lambda e: ["--config", e["data"] + "/list.yaml"], 1,
         ("list.yaml", "mapping")),
    Case("shards-missing", "train.stage1", lambda e: ["workdir=" + e["out"] + "/w", "model.base=" + e["model"],
                                                      "data.shards=" + e["data"] + "/no_shards"], 1,
         ("no_shards", "manifest.json"), lambda e: [e["out"] + "/w"]),
    # data pipelines
    Case("build-shards-images-missing", "data_pipelines.build_shards", lambda e: [
        "--images", e["data"] + "/no_images", "--out", e["out"] + "/s", "--analyzer", "dlib"], 1,
        ("--images", "no_images"), lambda e: [e["out"] + "/s"]),
    Case("build-shards-out-is-file", "data_pipelines.build_shards", lambda e: [
        "--images", e["data"], "--out", e["data"] + "/notes.txt", "--analyzer", "dlib"], 1,
        ("--out", "notes.txt", "existing file")),
]


def _error_line(err: str, code: int) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note: ")]
    assert lines, "nothing printed"
    if code == 2:  # argparse: usage lines, then "prog: error: …"
        assert ": error: " in lines[-1], lines
    else:
        assert lines[-1].startswith("error: ") and sum(ln.startswith("error: ") for ln in lines) == 1, lines
    return lines[-1]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_command_line_bad_input(case: Case, env, capsys):
    """One bad input through a command line: exit status, one error line naming the input and what was expected,
    no traceback, nothing at the output paths, the data folder unchanged."""
    import importlib

    before = tree_digest(env["data"])
    out_before = tree_digest(env["out"])
    main = importlib.import_module(case.command).main
    code = run_cli(main, case.argv(env))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code == case.code, err
    line = _error_line(err, case.code)
    for text in case.expect:
        assert text in line, (text, line)
    for path in case.outputs(env):
        assert not os.path.exists(path), path
    assert tree_digest(env["data"]) == before
    assert tree_digest(env["out"]) == out_before  # no temp files left either


# ---------------------------------------------------------------------------------------------- files we write
def test_outputs_follow_the_umask(env, tmp_path):
    """Shards, manifests, JSON, safetensors, PNGs and converted-style folders get the modes open()/mkdir would
    give under the umask (not tempfile's 0600 / 0700), and are replaced atomically."""
    from dynamicid_jax import file_io
    from dynamicid_jax.file_io import save_png
    from dynamicid_jax.weights.keymap import write_safetensors

    old = os.umask(0o027)
    try:
        write_shards(str(tmp_path / "shards"))
        save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png")
        write_safetensors({"w": np.zeros(2, np.float32)}, str(tmp_path / "w.safetensors"))
        file_io.write_json({"a": 1}, tmp_path / "x.json")
        with file_io.atomic_folder(tmp_path / "folder") as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
            file_io.write_text("hi", os.path.join(tmp, "sub", "f.txt"))
    finally:
        os.umask(old)
    files = [*(tmp_path / "shards").iterdir(), tmp_path / "a.png", tmp_path / "w.safetensors", tmp_path / "x.json",
             tmp_path / "folder" / "sub" / "f.txt"]
    for f in files:
        assert os.stat(f).st_mode & 0o777 == 0o640, (f, oct(os.stat(f).st_mode))
    for d in (tmp_path / "folder", tmp_path / "folder" / "sub"):
        assert os.stat(d).st_mode & 0o777 == 0o750, (d, oct(os.stat(d).st_mode))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    with pytest.raises(RuntimeError):  # a failed write leaves the old file and no temp file
        with file_io.atomic_path(tmp_path / "x.json") as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("boom")
    assert json.load(open(tmp_path / "x.json")) == {"a": 1}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_convert_overwrite_replaces_only_its_own_folder(tmp_path):
    """--overwrite replaces a folder carrying our manifest, and refuses one without it (untouched)."""
    from dynamicid_jax.pipelines.dynamicid import FOLDER_FORMAT, MANIFEST, check_overwritable

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    (ours / MANIFEST).write_text(json.dumps({"format": FOLDER_FORMAT, "parts": []}))
    theirs.mkdir()
    (theirs / MANIFEST).write_text(json.dumps({"format": "something else"}))
    check_overwritable(str(ours), True)
    with pytest.raises(FileExistsError, match="--overwrite refused"):
        check_overwritable(str(theirs), True)
    with pytest.raises(FileExistsError, match="already exists"):
        check_overwritable(str(ours), False)


def test_deprecated_spellings_still_work(env, capsys):
    """The old option names of infer.generate parse into the new ones and print a deprecation note."""
    from infer.generate import build_parser

    args = build_parser().parse_args(["--model", "m", "--prompt", "p", "--out", "o.png", "--ref", "a.png",
                                      "--reference", "b.png", "--clip-vision", "clip", "--face-backend", "dlib",
                                      "--face-root", "r"])
    assert args.reference == ["a.png", "b.png"] and args.image_encoder == "clip"
    assert args.analyzer == "dlib" and args.analyzer_root == "r"
    err = capsys.readouterr().err
    for old, new in (("--ref", "--reference"), ("--clip-vision", "--image-encoder"), ("--face-backend", "--analyzer"),
                     ("--face-root", "--analyzer-root")):
        assert f"note: {old} is deprecated; use {new}" in err


def test_debug_shows_the_traceback(env, capsys, monkeypatch):
    """--debug (or DYNAMICID_DEBUG=1) prints the traceback of a known error, then the same one-line error."""
    from infer import generate

    argv = ["--model", env["data"] + "/no_model", "--prompt", "a", "--out", env["out"] + "/x.png"]
    assert run_cli(generate.main, argv + ["--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")
    monkeypatch.setenv("DYNAMICID_DEBUG", "1")
    assert run_cli(generate.main, argv) == 1
    assert "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- signals
@pytest.mark.slow  # kept out of the default run for its 10-minute budget (make test-slow runs it)
def test_ctrl_c_during_sampling_stops_between_chunks(env, capsys, monkeypatch):
    """SIGINT while the tiny model samples: the run stops at the next chunk boundary, exits 130 with one line,
    and nothing is written at --out."""
    from dynamicid_jax.pipelines import stable_diffusion
    from infer import generate

    real = stable_diffusion.run_in_chunks
    calls = []

    def interrupting(step, carry, num_steps, **kw):
        def step_then_signal(c, lo, hi):
            out = step(c, lo, hi)
            calls.append(int(hi))
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the first chunk ran
            return out
        return real(step_then_signal, carry, num_steps, **kw)

    monkeypatch.setattr(stable_diffusion, "run_in_chunks", interrupting)
    # Python's own Ctrl-C handler, as in a command typed into a terminal: a test run started in the background
    # inherits SIGINT "ignored" from the shell, and Python keeps that
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = run_cli(generate.main, ["--model", env["model"], "--prompt", "a cat", "--height", "64", "--width",
                                       "64", "--steps", "8", "--out", os.path.join(env["out"], "interrupted.png")])
    finally:
        signal.signal(signal.SIGINT, previous)
    out = os.path.join(env["out"], "interrupted.png")
    err = capsys.readouterr().err
    assert calls == [1], (calls, err)  # stopped after the first chunk (one step), not after all 8
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    assert not os.path.exists(out) and not [n for n in os.listdir(env["out"]) if n.startswith(".tmp")]


def test_stage1_inputs_benchmark_names_a_missing_demo_or_base(tmp_path):
    """benchmarks/stage1_inputs.py stops with one line naming ``--demo`` (no finished demo there) or ``--base`` (not a
    diffusers folder), before it loads anything."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "stage1_inputs.py")

    def error_line(*argv):
        done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    demo = tmp_path / "demo"
    (demo / "work" / "face_models" / "image_encoder").mkdir(parents=True)
    (demo / "work" / "shards").mkdir(parents=True)
    for folder in (tmp_path / "none", demo):  # nothing there; no shard manifest
        line = error_line("--demo", str(folder))
        assert "--demo" in line and "make demo" in line, line
    (demo / "work" / "shards" / "manifest.json").write_text("{}")
    line = error_line("--demo", str(demo), "--base", str(tmp_path))
    assert "--base" in line and "model_index.json" in line, line
