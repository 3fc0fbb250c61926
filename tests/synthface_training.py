"""The small SynthFace training run several test modules share (module-scoped fixtures: each importing module
builds its own): a 2-identity world with its shards and recogniser, a tiny random SD base with SynthFace's widths,
one stage-1 step and a stage-2 export (tests/test_train_synthface.py describes the pieces)."""
import os

import jax
import numpy as np
import pytest

import synthface as sf

from tiny_synthface import EMBED, make_base, random_state

STAGE1 = ["model.image_encoder=random:tiny", "model.id_encoder_variant=tiny", "model.lora_rank=4",
          f"model.id_encoder_overrides={{id_embed_dim: {EMBED}, dim: 64, clip_dim: 64}}", "model.dtype=float32",
          "data.batch_size=8", "data.resolution=64", "data.read_threads=2", "train.steps=2", "train.log_every=1",
          "train.progress_bar=false", "checkpoint.every=1", "checkpoint.async=false", "sample.size=64"]
STAGE2 = ["model.imr_variant=tiny", "model.imr_overrides={embedding_dim: 64, txt_dim: 64}",
          "model.keypoint_variant=tiny", "model.keypoint_overrides={embedding_dim: 64}", "model.dtype=float32",
          "data.num_targets=8", "data.resolution=64", "data.read_threads=2", "train.steps=2", "train.log_every=1",
          "train.progress_bar=false", "checkpoint.every=0", "checkpoint.async=false", "token_cache.batch_size=16"]
HAPPY = "the expression is happy, the face is front view"  # a grid face prompt (docs/method.md §6.2)
IID = ["model.image_encoder=random:tiny", "model.encoder_variant=tiny", "model.dtype=float32",
       f"model.encoder_overrides={{id_embed_dim: {EMBED}, dim: 64, clip_dim: 64}}", "data.batch_size=8",
       "data.resolution=64", "data.read_threads=2", "train.steps=2", "train.log_every=1", "train.progress_bar=false",
       "checkpoint.every=0", "checkpoint.async=false"]


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 2-identity SynthFace world, a quickly trained recogniser and the face shards of the train split."""
    from data_pipelines.build_shards import build_shards
    from synthface.faces.recognizer import RecognizerConfig, train_recognizer

    root = tmp_path_factory.mktemp("synthface_train")
    data, models, shards = (str(root / n) for n in ("data", "models", "shards"))
    sf.generate(data, identities=2, seed=0, heldout=1, scenes=0, progress=False)
    images, records = sf.load_split(data, "train")
    labels = np.array([int(r["identity"][2:]) for r in records])
    kps = np.array([r["kps"] for r in records], np.float64)
    rec = train_recognizer(images, kps, labels, RecognizerConfig(embed_dim=EMBED, widths=(8, 16, 32)), steps=10,
                           batch_size=16, progress=False)
    rec.save(os.path.join(models, "recognizer"))
    build_shards(os.path.join(data, "train"), shards, "synthetic", analyzer_kwargs={"models_dir": models},
                 resolution=64, progress=False)
    return {"root": root, "data": data, "models": models, "shards": shards}


@pytest.fixture(scope="module")
def base(world):
    return make_base(str(world["root"] / "sd"))


@pytest.fixture(scope="module")
def mesh1():
    from dynamicid_jax import sharding as sh

    return sh.make_mesh(sh.MeshConfig(data=1), devices=jax.devices()[:1])


def stage_args(world, base, workdir, **extra):
    return [f"model.base={base}", f"data.shards={world['shards']}", f"workdir={workdir}",
            *(f"{k}={v}" for k, v in extra.items())]


@pytest.fixture(scope="module")
def stage1_run(world, base, mesh1, tmp_path_factory):
    """One stage-1 step through ``run`` (one device: the quick path), checkpointed."""
    from train import stage1

    workdir = str(tmp_path_factory.mktemp("w1"))
    path = stage1.run("train/configs/synthface_stage1.yaml", STAGE1 + stage_args(world, base, workdir) + ["train.steps=1"],
                      mesh=mesh1)
    return {"workdir": workdir, "export": path}


def reference_image(world, identity="ho00000", image="neutral_front"):
    return os.path.join(world["data"], "heldout", identity, f"{image}.png")


@pytest.fixture(scope="module")
def stage2_export(world, base, stage1_run, tmp_path_factory):
    """The token cache through its CLI, then a stage-2 export of random IMR / KeyPointEncoder params (the quick
    path: the stage-2 step is compiled in the slow end-to-end test)."""
    from train import stage1, stage2, token_cache

    workdir = str(tmp_path_factory.mktemp("w2"))
    args = STAGE2 + stage_args(world, base, workdir) + [f"model.stage1={stage1_run['export']}"]
    assert token_cache.main(["--config", "train/configs/synthface_stage2.yaml", *args]) == 0
    cfg = stage1.load("train/configs/synthface_stage2.yaml", args, defaults=stage2.DEFAULTS)
    stage = stage2.Stage2(cfg)
    return {"workdir": workdir, "args": args, "export": stage.export(random_state(stage.task()), workdir)}
