"""The two walks of docs/architecture.md, traced rather than read: the files of the library and the app packages in
which code runs while one training sample goes shard → loss (``train.stage1``) and while a prompt and a photo
become an image (``python -m infer.generate`` with a DynamicID folder) are exactly the files the walk's table lists.

A file counts when one of its functions (methods, lambdas and comprehensions included) runs during the walk; code
that runs because a module is imported (module and class bodies, registrations) does not. Walk 1 also names the
sample's own path inside the run: the functions called by the training loop's ``next(data_iter)`` and
``self.train_step(...)`` lines, or run by Grain (its reading threads), i.e. without the config, the model loading,
the checkpoints, the logs and the export around them. The jit caches are cleared first, so the UNet, the method and
the loss are traced again and their files count; so are the loaders' tokenizer caches, so the captions are tokenized
again. The face-analysis backend is the one file that differs from a user's walk: the tiny world has no face
detector, so the test registers its own backend (the sidecar faces of the references) where a user's walk runs
``dynamicid_jax/faces/insightface_backend.py``."""
import linecache
import os
import re
import sys
import threading

import jax
import pytest

from synthface_training import STAGE1, base, mesh1, reference_image, stage1_run, stage2_export, stage_args, world  # noqa: F401,E501
from tiny_synthface import ReferenceFace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dynamicid_jax", "data_pipelines", "train", "infer")
USER_BACKEND = "dynamicid_jax/faces/insightface_backend.py"
ARCHITECTURE = os.path.join(ROOT, "docs", "architecture.md")
LOOP = os.path.join(ROOT, "train", "loop.py")
SAMPLE_LINES = ("next(data_iter)", "self.train_step(")  # the lines of Trainer.fit that move one sample


def _on_sample_path(frame) -> bool:
    """Whether ``frame`` runs for the sample itself: Grain's code is among its callers (the reading threads), or
    ``Trainer.fit`` is, at one of :data:`SAMPLE_LINES`."""
    while frame is not None:
        name = frame.f_code.co_filename
        if os.sep + "grain" + os.sep in name:
            return True
        if name == LOOP and frame.f_code.co_name == "fit":
            line = linecache.getline(name, frame.f_lineno)
            return any(s in line for s in SAMPLE_LINES)
        frame = frame.f_back
    return False


def traced_files(fn, sample_path: set[str] | None = None) -> set[str]:
    """Repository files of :data:`PACKAGES` in which a function ran while ``fn()`` ran (imports excluded); those
    of them where a function ran on the sample's own path are added to ``sample_path`` when it is given."""
    prefixes = tuple(os.path.join(ROOT, p) + os.sep for p in PACKAGES)
    files: set[str] = set()

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if not code.co_filename.startswith(prefixes) or not code.co_flags & 0x02:  # CO_NEWLOCALS: a function
            return
        caller = frame.f_back
        while caller is not None:  # a function called by an import (a registration) is not part of the walk
            if caller.f_code.co_filename.startswith("<frozen importlib"):
                return
            caller = caller.f_back
        path = os.path.relpath(code.co_filename, ROOT)
        files.add(path)
        if sample_path is not None and path not in sample_path and _on_sample_path(frame.f_back):
            sample_path.add(path)

    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return files


def documented_files(section: str, level: str = "##") -> set[str]:
    """The ``.py`` paths (of :data:`PACKAGES`) written in the table of ``docs/architecture.md``'s section (``##``) or
    subsection (``###``) titled ``section``, up to its next heading."""
    with open(ARCHITECTURE, encoding="utf-8") as f:
        text = f.read()
    start = text.index(f"{level} {section}")
    end = text.find("\n#", start + 1)
    table = [line for line in text[start:end if end >= 0 else None].splitlines() if line.startswith("| ")]
    pattern = r"`((?:%s)/[\w/]+\.py)`" % "|".join(PACKAGES)
    return {p for line in table for p in re.findall(pattern, line)}


def _check(traced: set[str], section: str, level: str = "##") -> None:
    documented = documented_files(section, level)
    assert documented, f"no files listed under '{section}'"
    assert not documented - traced, f"listed but not run: {sorted(documented - traced)}; run: {sorted(traced)}"
    assert not traced - documented, f"run but not listed: {sorted(traced - documented)}"


def test_walk_1_shard_to_loss_runs_exactly_the_listed_files(world, base, mesh1, tmp_path):
    """One stage-1 step from the shards (``train.stage1.run``: config, base, loaders, step, checkpoint, export), and
    within it the sample's own path (shard → loss: the batch read and the train step on it)."""
    from data_pipelines import loaders
    from train import stage1

    jax.clear_caches()
    loaders._tokenizer.cache_clear()  # the captions are tokenized again, as in a fresh process
    loaders._tokens.cache_clear()
    args = STAGE1 + stage_args(world, base, str(tmp_path / "w")) + ["train.steps=1"]
    with open(LOOP, encoding="utf-8") as f:
        loop_source = f.read()
    assert all(s in loop_source for s in SAMPLE_LINES), f"Trainer.fit no longer has the lines {SAMPLE_LINES}"
    sample_path: set[str] = set()
    files = traced_files(lambda: stage1.run("train/configs/synthface_stage1.yaml", args, mesh=mesh1), sample_path)
    _check(files, "3. Walk 1")
    _check(sample_path, "The sample's own path", level="###")


def test_walk_2_prompt_and_photo_to_image_runs_exactly_the_listed_files(world, base, stage1_run, stage2_export,
                                                                          tmp_path, monkeypatch):
    """``python -m infer.generate`` with a DynamicID folder (SAA + IMR), one reference photo and a prompt."""
    from dynamicid_jax.faces import analyzer as analyzer_mod
    from dynamicid_jax.faces import get_analyzer, register_backend
    from infer import generate
    from train.export_dynamicid import export_dynamicid

    folder = export_dynamicid(stage1_run["export"], stage2_export["export"], str(tmp_path / "dynamicid"))
    ref = reference_image(world)
    monkeypatch.setattr(analyzer_mod, "_REGISTRY", dict(analyzer_mod._REGISTRY))
    monkeypatch.setattr(analyzer_mod, "_ROOT_KEYWORDS", dict(analyzer_mod._ROOT_KEYWORDS))
    register_backend("walk-reference", lambda root: ReferenceFace(get_analyzer("synthetic", root=root), ref))
    out = tmp_path / "out.png"
    argv = ["--model", base, "--dynamicid", folder, "--reference", ref, "--analyzer", "walk-reference",
            "--analyzer-root", world["models"], "--prompt", "a photo of a person", "--height", "64", "--width", "64",
            "--steps", "2", "--out", str(out)]
    jax.clear_caches()
    files = traced_files(lambda: generate.main(argv))
    assert out.is_file()
    _check(files | {USER_BACKEND}, "4. Walk 2")


@pytest.mark.parametrize("section,level", [("3. Walk 1", "##"), ("The sample's own path", "###"),
                                           ("4. Walk 2", "##")])
def test_the_walk_counts_in_the_text_match_the_tables(section, level):
    """The sentence under each table states the number of files it lists."""
    with open(ARCHITECTURE, encoding="utf-8") as f:
        text = f.read()
    start = text.index(f"{level} {section}")
    body = text[start:text.find("\n#", start + 1)]
    stated = re.search(r"(\d+) Python files", body)
    assert stated and int(stated.group(1)) == len(documented_files(section, level)), (stated and stated.group(0))
