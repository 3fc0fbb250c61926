"""The two walks of docs/architecture.md, traced rather than read: the files of the library and the app packages in
which code runs while one training sample goes shard → loss (``train.stage1``) and while a prompt and a photo
become an image (``python -m infer.generate`` with a DynamicID folder) are exactly the files the walk's table lists.

A file counts when one of its functions (methods, lambdas and comprehensions included) runs during the walk; code
that runs because a module is imported (module and class bodies, registrations) does not. The jit caches are
cleared first, so the UNet, the method and the loss are traced again and their files count. The face-analysis
backend is the one file that differs from a user's walk: the tiny world has no face detector, so the test registers
its own backend (the sidecar faces of the references) where a user's walk runs
``dynamicid_jax/faces/insightface_backend.py``."""
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


def traced_files(fn) -> set[str]:
    """Repository files of :data:`PACKAGES` in which a function ran while ``fn()`` ran (imports excluded)."""
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
        files.add(os.path.relpath(code.co_filename, ROOT))

    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return files


def documented_files(section: str) -> set[str]:
    """The ``.py`` paths (of :data:`PACKAGES`) written in the table of ``docs/architecture.md``'s section titled ``section``."""
    with open(ARCHITECTURE, encoding="utf-8") as f:
        text = f.read()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    table = [line for line in text[start:end if end >= 0 else None].splitlines() if line.startswith("| ")]
    pattern = r"`((?:%s)/[\w/]+\.py)`" % "|".join(PACKAGES)
    return {p for line in table for p in re.findall(pattern, line)}


def _check(traced: set[str], section: str) -> None:
    documented = documented_files(section)
    assert documented, f"no files listed under '{section}'"
    assert not documented - traced, f"listed but not run: {sorted(documented - traced)}; run: {sorted(traced)}"
    assert not traced - documented, f"run but not listed: {sorted(traced - documented)}"


def test_walk_1_shard_to_loss_runs_exactly_the_listed_files(world, base, mesh1, tmp_path):
    """One stage-1 step from the shards (``train.stage1.run``: config, base, loaders, step, checkpoint, export)."""
    from train import stage1

    jax.clear_caches()
    args = STAGE1 + stage_args(world, base, str(tmp_path / "w")) + ["train.steps=1"]
    files = traced_files(lambda: stage1.run("train/configs/synthface_stage1.yaml", args, mesh=mesh1))
    _check(files, "3. Walk 1")


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


@pytest.mark.parametrize("section", ["3. Walk 1", "4. Walk 2"])
def test_the_walk_counts_in_the_text_match_the_tables(section):
    """The sentence under each table states the number of files it lists."""
    with open(ARCHITECTURE, encoding="utf-8") as f:
        text = f.read()
    start = text.index(f"## {section}")
    body = text[start:text.find("\n## ", start + 1)]
    stated = re.search(r"(\d+) Python files", body)
    assert stated and int(stated.group(1)) == len(documented_files(section)), (stated and stated.group(0))
