"""Bad inputs through the library: each raises an error the command lines report as one line naming the input
(the exception type is one of ``dynamicid_jax.errors.KNOWN_ERRORS``), and the data folder stays byte-for-byte
unchanged; a shard with junk over one record is skipped and counted. The command-line cases are
tests/test_bad_inputs.py; both read the world of tests/bad_input_env.py."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np
import pytest

from dynamicid_jax.errors import KNOWN_ERRORS, format_error

from bad_input_env import broken_shards, make_env, tree_digest


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_sd_dir):
    """The data folder every case must leave untouched, and the paths the cases point at (tests/bad_input_env.py)."""
    return make_env(tmp_path_factory.mktemp("bad_inputs"), tiny_sd_dir)


@dataclasses.dataclass(frozen=True)
class LibCase:
    id: str
    call: Callable[[dict], Any]
    error: type
    expect: tuple[str, ...]


def _sd(env):
    if "sd" not in env:
        from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion

        env["sd"] = StableDiffusion.from_pretrained(env["model"])
    return env["sd"]


def _gen_lib(**kw):
    def call(env):
        args = dict(prompts=["a cat"], height=64, width=64, steps=2, guidance_scale=7.5)
        args.update(kw)
        return _sd(env).generate(args.pop("prompts"), **args)
    return call


def _load(name):
    def call(env):
        from dynamicid_jax.faces import load_rgb

        return load_rgb(os.path.join(env["data"], name) if isinstance(name, str) else name)
    return call


def _saa(boxes, num_ids=1, size=(64, 64), **kw):
    def call(env):
        from dynamicid_jax.methods.saa import saa_inputs

        return saa_inputs(num_ids, size, boxes, latent_grid=(size[0] // 8, size[1] // 8), **kw)
    return call


def _stage1_loader(how: str, fraction: float):
    def call(env):
        from data_pipelines import loaders as L

        cfg = L.Stage1Config(batch_size=1, resolution=32, clip_size=32, num_epochs=1, distinct_reference=False,
                             max_corrupt_fraction=fraction, corrupt_grace=1, process_index=0, process_count=1)
        return list(L.stage1_loader(broken_shards(env, how, how), cfg))
    return call


def _open(how: str):
    def call(env):
        from data_pipelines.shards import open_shards

        return open_shards(broken_shards(env, how, how))
    return call


def _scheduler(**cfg):
    def call(env):
        from dynamicid_jax.schedulers import SD15_SCHEDULER_CONFIG, load_scheduler

        kind = cfg.pop("kind", None)
        return load_scheduler({**SD15_SCHEDULER_CONFIG, **cfg}, kind=kind)
    return call


def _weights_reshape(env):
    """A Linear weight of the wrong size where a 1×1 conv is expected (needs the reshape the loader does)."""
    from dynamicid_jax.models.vae import VAE_KEYMAP
    from dynamicid_jax.weights.keymap import load_state_dict

    abstract = {"decoder": {"conv_out": {"kernel": jax_shape((1, 1, 8, 3)), "bias": jax_shape((3,))}}}
    state = {"decoder.conv_out.weight": np.zeros((3, 5), np.float32), "decoder.conv_out.bias": np.zeros(3, np.float32)}
    return load_state_dict(state, VAE_KEYMAP, abstract, source="bad.safetensors")


def jax_shape(shape):
    import jax

    return jax.ShapeDtypeStruct(shape, np.float32)


def _config(overrides):
    def call(env):
        from train import stage1

        return stage1.load(None, overrides)
    return call


LIB_CASES = [
    LibCase("lib-guidance-nan", _gen_lib(guidance_scale=float("nan")), ValueError, ("guidance_scale", "finite", "nan")),
    LibCase("lib-guidance-inf", _gen_lib(guidance_scale=float("inf")), ValueError, ("guidance_scale", "finite", "inf")),
    LibCase("lib-no-prompts", _gen_lib(prompts=[]), ValueError, ("prompts", "non-empty")),
    LibCase("lib-65-prompts", _gen_lib(prompts=["a"] * 65), ValueError, ("65 prompts", "at most 64")),
    LibCase("lib-3000-prompts", _gen_lib(prompts=["a"] * 3000), ValueError, ("3000 prompts", "at most 64")),
    LibCase("lib-size-4096", _gen_lib(height=4096, width=4096), ValueError, ("4096×4096", "needs about", "more than")),
    LibCase("lib-latents-shape", _gen_lib(latents=np.zeros((1, 4, 4, 4))), ValueError, ("latents", "shape")),
    LibCase("lib-negatives-count", _gen_lib(negative_prompt=["a", "b"]), ValueError, ("negative_prompt", "2 entries")),
    LibCase("lib-steps-1000", _gen_lib(steps=1000), ValueError, ("num_inference_steps=1000", "1..999")),
    LibCase("lib-steps-6000", _gen_lib(steps=6000), ValueError, ("num_inference_steps=6000", "1..999")),
    LibCase("box-below-one-cell", _saa([[0.0, 0.0, 0.05, 0.05]]), ValueError,
            ("box 0", "covers no cell", "8×8 latent grid")),
    LibCase("boxes-overlap", _saa([[0, 0, .6, .6], [.4, .4, 1, 1]], num_ids=2), ValueError, ("overlap",)),
    LibCase("box-outside", _saa([[0, 0, 1.2, 1]]), ValueError, ("[0, 1]", "1.2")),
    LibCase("box-inverted", _saa([[.5, 0, .2, 1]]), ValueError, ("empty or inverted",)),
    LibCase("box-nan", _saa([[0, 0, float("nan"), 1]]), ValueError, ("[0, 1]",)),
    LibCase("mix-out-of-range", _saa([[0, 0, 1, 1]], num_ids=2, mix=1.5), ValueError, ("mix", "[0, 1]")),
    LibCase("image-12000", _load("huge.png"), ValueError, ("huge.png", "12000×12000", "at most 100 megapixels")),
    LibCase("image-bomb-14000", _load("bomb.png"), ValueError, ("bomb.png", "at most 100 megapixels")),
    LibCase("image-truncated", _load("truncated.png"), ValueError, ("truncated.png", "not a valid or complete")),
    LibCase("image-text", _load("not_an_image.jpg"), ValueError, ("not_an_image.jpg",)),
    LibCase("image-folder", _load("not_sd"), ValueError, ("not_sd", "directory")),
    LibCase("image-missing", _load("ghost.png"), FileNotFoundError, ("ghost.png", "does not exist")),
    LibCase("image-nan-array", _load(np.full((8, 8, 3), np.nan, np.float32)), ValueError, ("NaN",)),
    LibCase("image-five-channels", _load(np.zeros((8, 8, 5), np.uint8)), ValueError, ("[H, W, 3]", "(8, 8, 5)")),
    LibCase("image-array-huge", _load(np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (20000, 20000, 3))), ValueError,
            ("20000×20000", "at most 100 megapixels")),
    LibCase("shard-empty", _open("empty"), ValueError, ("faces-00001-of-00004.array_record", "cannot be opened")),
    LibCase("shard-truncated", _open("truncated"), ValueError, ("faces-00001-of-00004.array_record", "corrupt")),
    LibCase("shard-missing", _open("missing"), FileNotFoundError, ("faces-00001-of-00004.array_record", "missing")),
    LibCase("manifest-invalid", _open("manifest"), ValueError, ("manifest.json", "invalid JSON")),
    LibCase("shard-junk-over-budget", _stage1_loader("junk", 0.0), RuntimeError,
            ("faces-00001-of-00004.array_record", "max_corrupt_fraction=0.0")),
    LibCase("scheduler-karras-into-ddim", _scheduler(_class_name="DPMSolverSinglestepScheduler",
                                                     use_karras_sigmas=True, kind="ddim"), ValueError,
            ("use_karras_sigmas=True", "DDIMScheduler")),
    LibCase("scheduler-thresholding", _scheduler(_class_name="DPMSolverMultistepScheduler", thresholding=True,
                                                 kind="euler"), ValueError, ("thresholding=True",)),
    LibCase("scheduler-unknown-key", _scheduler(not_a_field=1), ValueError, ("unknown keys: not_a_field",)),
    LibCase("weights-reshape", _weights_reshape, ValueError, ("bad.safetensors", "decoder.conv_out.weight", "(3, 5)")),
    LibCase("config-ema-list", _config(["train.ema_decay=[1, 2]"]), ValueError, ("train.ema_decay",)),
    LibCase("config-tokenizer-number", _config(["data.tokenizer=5"]), ValueError, ("data.tokenizer", "string")),
]


@pytest.mark.parametrize("case", LIB_CASES, ids=[c.id for c in LIB_CASES])
def test_library_bad_input(case: LibCase, env):
    """One bad input through the library: an error the command lines report in one line, naming the input."""
    before = tree_digest(env["data"])
    with pytest.raises(case.error) as info:
        case.call(env)
    assert isinstance(info.value, KNOWN_ERRORS), type(info.value)
    line = format_error(info.value)
    assert "\n" not in line
    for text in case.expect:
        assert text in line, (text, line)
    assert tree_digest(env["data"]) == before


def test_known_skip_counts_junk_records(env):
    """A shard with junk over one record: the loader skips and counts it (below the budget), naming the shard."""
    from data_pipelines import loaders as L

    cfg = L.Stage1Config(batch_size=1, resolution=32, clip_size=32, num_epochs=1, distinct_reference=False,
                         max_corrupt_fraction=0.5, corrupt_grace=4, process_index=0, process_count=1)
    it = iter(L.stage1_loader(broken_shards(env, "junk", "junk"), cfg))
    batches = list(it)
    assert it.stats["skipped"] == 1 and len(batches) == 7
    assert "faces-00001-of-00004.array_record" in it.stats["recent_errors"][0]
