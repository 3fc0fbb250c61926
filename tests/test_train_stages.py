"""Stage 1 / stage 2 tasks and the token cache on a tiny random SD (in-memory batches in the loaders' contract).

Tracing or compiling a stage step (a tiny UNet's backward pass) is slow on CPU: those tests are marked slow;
the default run checks the trees, the drop rules, the stage-2 batch layout and the token cache."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dynamicid_jax.methods import saa as saa_lib
from train import loop, runs, stage1, stage2, token_cache
from train.config import load_config

from gradient_checks import (assert_bitwise_unchanged, assert_gradients_on_every_leaf, snapshot,
                             trainable_gradients)

TINY1 = ["model.image_encoder=random:tiny", "model.id_encoder_variant=tiny",
         "model.id_encoder_overrides={clip_dim: 64}", "model.lora_rank=4", "model.dtype=float32",
         "train.progress_bar=false", "train.log_every=1", "checkpoint.every=0"]
TINY2 = ["model.imr_variant=tiny", "model.keypoint_variant=tiny", "model.id_encoder_variant=tiny",
         "model.id_encoder_overrides={clip_dim: 64}", "model.lora_rank=4", "model.dtype=float32",
         "train.progress_bar=false", "train.log_every=1", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tiny_sd import make_tiny_sd

    folder = make_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))
    return runs.load_base(folder, jnp.float32)


@pytest.fixture(scope="module")
def s1(base):
    cfg = load_config(None, TINY1 + [f"model.base={base.source}"], defaults=stage1.DEFAULTS)
    return stage1.Stage1(cfg, base=base)


def stage1_batch(b=4, seed=0, pixels=False):
    rng = np.random.default_rng(seed)
    batch = {"ref_clip_pixels": rng.standard_normal((b, 32, 32, 3)).astype(np.float32),
             "ref_id_embedding": rng.standard_normal((b, 16)).astype(np.float32),
             "input_ids": rng.integers(1, 1000, (b, 77)).astype(np.int32), "identity": np.arange(b, dtype=np.int32)}
    if pixels:
        batch["target_pixels"] = rng.uniform(-1, 1, (b, 64, 64, 3)).astype(np.float32)
    else:
        batch["target_latent_moments"] = rng.standard_normal((b, 8, 8, 8)).astype(np.float32)
    return batch


def _paths(tree):
    return {"/".join(k) for k in traverse_util.flatten_dict(loop._unboxed(tree))}


def test_drop_bands():
    drop_id, drop_text = jax.jit(stage1.drop_masks, static_argnums=(1,))(jax.random.key(0), 200_000, 0.05, 0.05,
                                                                         0.05)
    drop_id, drop_text = np.asarray(drop_id), np.asarray(drop_text)
    assert abs(np.mean(drop_id & ~drop_text) - 0.05) < 0.003
    assert abs(np.mean(drop_text & ~drop_id) - 0.05) < 0.003
    assert abs(np.mean(drop_id & drop_text) - 0.05) < 0.003


def test_stage1_trees_and_init(s1, base):
    """Trainable = ID encoder + SAA only (LoRA and *_ip, no base UNet weight); *_ip start as to_k / to_v; the
    frozen side holds the UNet, VAE, text and image encoders and no optimizer ever sees them."""
    task = s1.task()
    trainable = _paths(task.abstract_trainable)
    assert {p.split("/")[0] for p in trainable} == {"id_encoder", "saa"}
    saa_paths = [p for p in trainable if p.startswith("saa/")]
    assert saa_paths and all(saa_lib.is_saa_path(tuple(p.split("/"))) for p in saa_paths)
    assert set(task.frozen) == {"unet", "vae", "text_encoder", "image_encoder"}
    assert not any(saa_lib.is_saa_path(k) for k in traverse_util.flatten_dict(task.frozen["unet"]))
    params, mutable = jax.jit(task.init)(jax.random.key(0), task.frozen)
    assert _paths(params) == trainable and mutable == {}
    flat, base_flat = traverse_util.flatten_dict(params["saa"]), traverse_util.flatten_dict(task.frozen["unet"])
    ip = [k for k in flat if k[-2] == "to_k_ip"]
    assert ip
    for k in ip:
        np.testing.assert_array_equal(flat[k], base_flat[k[:-2] + ("to_k", "kernel")])
    # the uncond CLIP features are those of the zero (normalised grey) image
    assert s1.uncond_clip.shape == (1, 65, 64)


@pytest.mark.slow
def test_stage1_gradients_reach_exactly_the_trainable_params(s1):
    """The stage-1 loss differentiated w.r.t. the trainable tree: every leaf (ID encoder, every LoRA, every
    to_k_ip / to_v_ip) gets a finite, non-zero gradient and the gradient tree is exactly the trainable tree; a
    traced step of the loop gives a scalar loss and the stage's metrics."""
    task = s1.task()
    params, mutable = jax.jit(task.init)(jax.random.key(0), task.frozen)
    params = _with_nonzero_lora_ups(params)
    batch = loop.numeric_batch(stage1_batch())  # latent moments; the mesh test also runs target_pixels
    loss, (metrics, _), grads = trainable_gradients(task.loss_fn, params, task.frozen, mutable, batch,
                                                    jax.random.key(3))
    assert np.isfinite(float(loss)) and float(metrics["drop_id_frac"]) < 1  # some rows keep their identity
    assert_gradients_on_every_leaf(grads, params)
    tx, sched = loop.make_optimizer({"lr": 1e-4, "clip_grad_norm": 1.0})
    step = loop.make_train_step(task.loss_fn, tx, lr_schedule=sched)
    abstract_state, _ = loop.state_shardings(task, tx, _one_device_mesh(), False)
    _, step_metrics = jax.eval_shape(step, abstract_state, task.frozen, batch)
    assert step_metrics["loss"].shape == () and {"drop_id_frac", "drop_text_frac", "grad_norm", "lr"} <= set(
        step_metrics)


def _with_nonzero_lora_ups(params, seed=0):
    """SAA's LoRA up-projections start at zero, which makes their down-projections' gradients exactly zero; small
    random values let every leaf's connection to the loss show."""
    flat = traverse_util.flatten_dict(params["saa"])
    rng = np.random.default_rng(seed)
    flat = {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float32) if k[-2] == "up" else v
            for k, v in flat.items()}
    assert any(k[-2] == "up" for k in flat)
    return {**params, "saa": traverse_util.unflatten_dict(flat)}


@pytest.mark.slow
def test_stage1_trains_on_a_mesh(s1, tmp_path):
    """Two stage-1 steps on a data=2 × fsdp=2 mesh: the loss is finite, SAA's LoRA up-projections (zero at init)
    and the ID encoder move; the frozen UNet does not."""
    task = s1.task(references=stage1_batch(1))
    cfg = load_config(None, TINY1 + ["mesh.data=2", "mesh.fsdp=2", "train.steps=2", "train.sample_every=2",
                                     "sample.steps=2", "sample.size=64", 'sample.prompts=["a", "b"]'],
                      defaults=stage1.DEFAULTS)
    tr = loop.Trainer(task, cfg, str(tmp_path), mesh=_mesh(data=2, fsdp=2))
    data = iter([stage1_batch(4, 1), stage1_batch(4, 2, pixels=True)])  # both target formats
    state0 = jax.device_get(tr.init_state())
    frozen0 = snapshot(tr.frozen)
    state = tr.fit(data)
    assert_bitwise_unchanged(frozen0, tr.frozen, "stage-1 frozen params (UNet, VAE, text and image encoders)")
    after = jax.device_get(state.trainable)
    ups = [k for k in traverse_util.flatten_dict(after["saa"]) if k[-2] == "up"]
    assert all(np.abs(traverse_util.flatten_dict(after["saa"])[k]).max() > 0 for k in ups)
    assert not np.allclose(after["id_encoder"]["proj_0"]["kernel"], state0.trainable["id_encoder"]["proj_0"]["kernel"])
    assert os.listdir(tmp_path / "samples")
    path = s1.export(state, str(tmp_path))
    assert set(runs.load_params(path)) == {"id_encoder", "saa"}


# ------------------------------------------------------------------------------------------------ stage 2
@pytest.fixture(scope="module")
def stage1_export(s1):
    params, _ = jax.jit(s1.init)(jax.random.key(1), s1.frozen)
    return jax.device_get(params)


@pytest.fixture(scope="module")
def s2(base, stage1_export):
    cfg = load_config(None, TINY2 + [f"model.base={base.source}"], defaults=stage2.DEFAULTS)
    return stage2.Stage2(cfg, base=base, stage1_params=stage1_export)


def stage2_batch(g=1, t=4, seed=0):
    rng = np.random.default_rng(seed)
    raster = lambda *s: np.where(rng.uniform(size=s) < 0.02, 1.0, -1.0).astype(np.float32)  # noqa: E731
    return {"src_raster": raster(g, 96, 96, 1), "tgt_rasters": raster(g, t, 96, 96, 1),
            "src_face_prompt_ids": rng.integers(1, 1000, (g, 77)).astype(np.int32),
            "tgt_face_prompt_ids": rng.integers(1, 1000, (g, t, 77)).astype(np.int32),
            "tgt_latent_moments": rng.standard_normal((g, t, 8, 8, 8)).astype(np.float32),
            "src_index": np.arange(g, dtype=np.int32), "tgt_index": rng.integers(0, 5, (g, t)).astype(np.int32),
            "identity": np.arange(g, dtype=np.int32),
            "src_tokens": rng.standard_normal((g, 4, 32)).astype(np.float32),
            "tgt_tokens": rng.standard_normal((g, t, 4, 32)).astype(np.float32)}


def test_stage2_trees_and_batch_shardings(s2, stage1_export):
    """Trainable = IMR + KeyPointEncoder, mutable = its BatchNorm statistics; the frozen UNet carries the stage-1
    SAA params; with one identity per step the targets are split over the devices."""
    task = s2.task()
    assert {p.split("/")[0] for p in _paths(task.abstract_trainable)} == {"imr", "keypoint_encoder"}
    assert set(task.abstract_mutable) == {"batch_stats"}
    frozen_unet = traverse_util.flatten_dict(task.frozen["unet"])
    assert any(saa_lib.is_saa_path(k) for k in frozen_unet)
    # G = 1 on 8 devices: the targets are split, the source replicated
    mesh = _mesh(data=8)
    shardings = stage2.batch_shardings(mesh, stage2_batch(1, 8))
    assert shardings["tgt_rasters"].spec[1] == ("data", "fsdp")
    assert shardings["src_raster"].spec == jax.sharding.PartitionSpec()


@pytest.mark.slow
def test_stage2_gradients_and_batch_statistics(s2):
    """The stage-2 loss differentiated w.r.t. the trainable tree: both loss terms, a finite non-zero gradient on
    every IMR and KeyPointEncoder leaf and on nothing else, and new BatchNorm statistics (train mode); a traced step
    of the loop returns the stage's metrics."""
    task = s2.task()
    params, mutable = jax.jit(task.init)(jax.random.key(0), task.frozen)
    batch = loop.numeric_batch(stage2_batch())
    loss, (metrics, new_mutable), grads = trainable_gradients(task.loss_fn, params, task.frozen, mutable, batch,
                                                              jax.random.key(3))
    assert np.isfinite(float(loss)) and float(metrics["token_mse"]) > 0 and float(metrics["eps_mse"]) > 0
    assert_gradients_on_every_leaf(grads, params)
    old, new = traverse_util.flatten_dict(mutable), traverse_util.flatten_dict(new_mutable)
    assert set(old) == set(new) and all(not np.allclose(old[k], new[k]) for k in old)  # every mean and variance
    tx, sched = loop.make_optimizer({"lr": 1e-4})
    step = loop.make_train_step(task.loss_fn, tx, lr_schedule=sched)
    abstract_state, _ = loop.state_shardings(task, tx, _one_device_mesh(), False)
    _, step_metrics = jax.eval_shape(step, abstract_state, task.frozen, batch)
    assert {"token_mse", "eps_mse", "loss"} <= set(step_metrics)


@pytest.mark.slow
def test_stage2_trains(s2, tmp_path):
    """Two stage-2 steps: finite loss, IMR params move, BatchNorm statistics update, nothing else changes."""
    cfg = load_config(None, TINY2 + ["mesh.data=4", "train.steps=2"], defaults=stage2.DEFAULTS)
    task = s2.task()
    tr = loop.Trainer(task, cfg, str(tmp_path), mesh=_mesh(data=4))
    state0 = jax.device_get(tr.init_state())
    frozen0 = snapshot(tr.frozen)
    state = tr.fit(iter([stage2_batch(1, 4, 1), stage2_batch(1, 4, 2)]))
    assert_bitwise_unchanged(frozen0, tr.frozen, "stage-2 frozen params (UNet with the stage-1 SAA, text encoder)")
    after = jax.device_get(state)
    assert not np.allclose(after.trainable["imr"]["proj_out"]["kernel"], state0.trainable["imr"]["proj_out"]["kernel"])
    bs0, bs1 = (traverse_util.flatten_dict(s.mutable) for s in (state0, after))
    assert any(not np.allclose(bs0[k], bs1[k]) for k in bs0)
    assert set(runs.load_params(s2.export(state, str(tmp_path)))) == {"imr", "keypoint_encoder", "batch_stats"}


# ------------------------------------------------------------------------------------------------ token cache
def test_token_cache_build_and_lookup(s1, stage1_export, tmp_path):
    """Two "processes" write their parts (short last batches padded); the joined cache holds the stage-1
    encoder's tokens by record index, and the Grain-side lookup attaches src/tgt tokens (unknown records fail)."""
    cfg = load_config(None, TINY2, defaults=stage2.DEFAULTS)
    encode = token_cache.make_encoder(cfg, stage1_params=stage1_export,
                                      image_encoder=(s1.image_module, s1.frozen["image_encoder"], "random:tiny"))
    recs = _records(7)
    for p in range(2):  # record_loader's layout: process p gets indices p, p+2, ...
        sel = np.arange(p, 7, 2)
        batches = [{k: v[sel[i:i + 2]] for k, v in recs.items()} for i in range(0, len(sel), 2)]
        token_cache.build_token_cache(batches, encode, str(tmp_path), batch_size=2, process_index=p,
                                      process_count=2)
    cache = token_cache.TokenCache.load(str(tmp_path))
    feats = runs.clip_penultimate(s1.image_module, s1.frozen["image_encoder"], recs["ref_clip_pixels"])
    want = s1.id_encoder.apply({"params": stage1_export["id_encoder"]}, recs["ref_id_embedding"], feats)
    np.testing.assert_allclose(cache.tokens, np.asarray(want), rtol=1e-5, atol=1e-5)
    assert cache.present.all() and cache.tokens.shape == (7, 4, 32)
    element = token_cache.TokenLookup(cache)({"src_index": np.array([3]), "tgt_index": np.array([[0, 6, 6]])})
    assert element["src_tokens"].shape == (1, 4, 32) and element["tgt_tokens"].shape == (1, 3, 4, 32)
    np.testing.assert_array_equal(element["tgt_tokens"][0, 1], cache.tokens[6])
    with pytest.raises(KeyError, match="not in the token cache"):
        token_cache.TokenLookup(cache)({"src_index": np.array([9]), "tgt_index": np.array([[0]])})
    os.remove(tmp_path / "tokens.p1-of-2.safetensors")
    with pytest.raises(ValueError, match="incomplete"):
        token_cache.TokenCache.load(str(tmp_path))


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"index": np.arange(n, dtype=np.int32), "identity": np.arange(n, dtype=np.int32) // 2,
            "ref_id_embedding": rng.standard_normal((n, 16)).astype(np.float32),
            "ref_clip_pixels": rng.standard_normal((n, 32, 32, 3)).astype(np.float32)}


def _mesh(data, fsdp=1):
    from dynamicid_jax import sharding as sh

    return sh.make_mesh(sh.MeshConfig(data=data, fsdp=fsdp), devices=jax.devices()[:data * fsdp])


def _one_device_mesh():
    return _mesh(data=1)
