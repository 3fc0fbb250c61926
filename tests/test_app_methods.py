"""The web app's engine with every method and a second scheduler (``@slow``: three more samplers to compile).

Plain SD, Infinite-ID (random tiny weights beside the DynamicID ones of tests/app_world.py) and DynamicID with
DPM-Solver++ 2M, each through :meth:`infer.app_engine.Engine.generate`."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import app_world as W

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_sd_dir, torch, tmp_path_factory):
    pytest.importorskip("dlib", reason="the app tests analyse real faces with dlib (the faces extra)")
    if W.group_photo() is None:
        pytest.skip("the test photos ship in the insightface package, which is not installed")
    import flax.linen as nn
    import jax

    from dynamicid_jax.methods import infinite_id as iid
    from dynamicid_jax.methods.infinite_id_weights import save_infinite_id
    from dynamicid_jax.models.unet import UNetConfig
    from dynamicid_jax.weights import keymap as km
    from infer.app_engine import Engine
    from infer.app_models import ModelSpec, load_models

    folder = str(tmp_path_factory.mktemp("app_methods"))
    paths = W.build_tiny_models(folder, tiny_sd_dir)
    unet_config = UNetConfig.from_dict(km.read_config(km.find_component(tiny_sd_dir, "unet")))
    enc = iid.infinite_id_encoder_config("tiny", id_embed_dim=128, clip_dim=W.VISION["hidden_size"])
    rng = np.random.default_rng(0)
    ids = jax.tree_util.tree_map(lambda s: (rng.standard_normal(s.shape) * 0.3).astype(np.float32),
                                 nn.meta.unbox(iid.abstract_id_params(unet_config)))
    weights = os.path.join(folder, "infinite_id")
    save_infinite_id(weights, enc, iid.init_encoder_params(enc, jax.random.key(0)), ids, unet_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = load_models(ModelSpec(sd=paths["sd"], dynamicid=paths["dynamicid"],
                                       clip_vision=paths["clip_vision"], analyzer="dlib", infinite_id=weights,
                                       infinite_id_clip_vision=paths["clip_vision"]))
    refs = W.write_references(os.path.join(folder, "refs"))
    return Engine(models, max_queue=2), refs


@pytest.mark.parametrize("method, scheduler", [("plain SD", "ddim"), ("Infinite-ID", "ddim"),
                                               ("DynamicID", "dpm++2m")])
def test_methods_and_schedulers(engine, method, scheduler):
    """Each method / scheduler generates a 64×64 image; DynamicID also gives its gate overlays, the others none;
    a second identical request reuses the compiled sampler."""
    from infer.app_engine import Request

    eng, refs = engine
    assert "Infinite-ID" in eng.methods
    request = Request(prompt="a photo of a person", references=[refs["person_1"]], method=method,
                      scheduler=scheduler, steps=2, seed=1)
    first = eng.generate(request)
    assert first.image.shape == (64, 64, 3) and first.image.dtype == np.uint8
    assert len(first.gate_overlays) == (1 if method == "DynamicID" else 0)
    assert len(first.faces) == (0 if method == "plain SD" else 1)
    second = eng.generate(request)
    assert first.compiled and not second.compiled
    np.testing.assert_array_equal(first.image, second.image)
