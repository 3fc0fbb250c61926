"""The generic train loop (train/loop.py) on the synthetic smoke task and 8 virtual CPU devices."""
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from jax.sharding import PartitionSpec as P

from dynamicid_jax import sharding as sh
from train import loop
from train.config import ConfigError, load_config
from train.smoke import smoke_config, smoke_dataset, smoke_record, smoke_task
from train.tensorboard import EventWriter, crc32c, read_records


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _batch(n, start=0):
    recs = [smoke_record(i) for i in range(start, start + n)]
    return {k: np.stack([r[k] for r in recs]) for k in recs[0]}


MESH = dict(data=2, fsdp=4)


@pytest.fixture(scope="module")
def task():
    return smoke_task()


def _trainer(task, tmp, mesh_cfg, **train):
    cfg = smoke_config(4, train=train)
    return loop.Trainer(task, cfg, str(tmp), mesh=sh.make_mesh(sh.MeshConfig(**mesh_cfg)))


def test_sharded_step_equals_single_device(task, tmp_path):
    """data×fsdp = 2×4 over 8 devices: params really are split, and 2 steps give the single-device numbers."""
    single = loop.Trainer(task, smoke_config(2), str(tmp_path / "a"), mesh=sh.make_mesh(
        sh.MeshConfig(data=1), devices=jax.devices()[:1]))
    multi = _trainer(task, tmp_path / "b", MESH)
    kernel = multi.state_sh.trainable["ff_in"]["kernel"]
    assert kernel.spec == P("fsdp", "tensor")
    assert multi.state_sh.opt_state[1][0].mu["ff_in"]["kernel"].spec == P("fsdp", "tensor")  # adam moments too
    results = []
    for tr in (single, multi):
        state = tr.init_state()
        for i in range(2):
            state, metrics = tr.train_step(state, _batch(8, 8 * i))
        results.append((_flat(state.trainable), _flat(state.opt_state), float(metrics["loss"]),
                        state.trainable["ff_in"]["kernel"]))
    (p1, o1, l1, _), (p8, o8, l8, k8) = results
    assert k8.addressable_shards[0].data.size == k8.size // 4  # fsdp=4: each device stores a quarter
    assert np.isclose(l1, l8, rtol=1e-5, atol=1e-7)  # the sharded reduction order differs: ~1e-6 apart
    for name in p1:
        np.testing.assert_allclose(p8[name], p1[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for name in o1:
        np.testing.assert_allclose(o8[name], o1[name], rtol=1e-5, atol=1e-7, err_msg=name)
    initial = _flat(loop._unboxed(task.init(jax.random.key(0), task.frozen)[0]))
    assert any(np.abs(p1[n] - v).max() > 0 for n, v in initial.items())


def test_frozen_params_have_no_optimizer_state(task, tmp_path):
    tr = _trainer(task, tmp_path, MESH)
    state = tr.init_state()
    frozen_sizes = sorted(np.shape(x) for x in jax.tree_util.tree_leaves(task.frozen))
    trainable = jax.tree_util.tree_leaves(state.trainable)
    opt = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x)]
    # Adam keeps exactly mu and nu of every trainable param, nothing for the frozen projection
    assert len(opt) == 2 * len(trainable)
    assert sum(x.size for x in opt) == 2 * sum(x.size for x in trainable)
    assert (4, 4) in frozen_sizes and (4, 4) not in [tuple(np.shape(x)) for x in opt]
    before = _flat(tr.frozen)
    state, _ = tr.train_step(state, _batch(8))
    after = _flat(tr.frozen)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_task_with_given_initial_params_starts_from_them(task, tmp_path):
    """``init=None`` + ``initial`` (stage 0's host-drawn params) gives the state ``init`` would, sharded."""
    import dataclasses

    drawn, mutable = jax.device_get(loop._unboxed(task.init(jax.random.key(0), task.frozen)))
    given = dataclasses.replace(task, init=None, initial=(drawn, mutable))
    tr = _trainer(given, tmp_path, MESH, ema_decay=0.9)
    state = tr.init_state()
    assert state.trainable["ff_in"]["kernel"].sharding.spec == P("fsdp", "tensor")
    for name, value in _flat(drawn).items():
        np.testing.assert_array_equal(_flat(state.trainable)[name], value, err_msg=name)
        np.testing.assert_array_equal(_flat(state.ema)[name], value, err_msg=name)
    assert int(state.step) == 0 and all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(
        state.opt_state) if np.ndim(x))
    state, _ = tr.train_step(state, _batch(8))
    assert int(state.step) == 1
    with pytest.raises(ValueError, match="exactly one of init"):
        dataclasses.replace(task, init=None)
    with pytest.raises(ValueError, match="exactly one of init"):
        dataclasses.replace(task, initial=(drawn, mutable))


def test_gradient_accumulation_matches_full_batch(task):
    """accum_steps=2 over the same 8 rows = one full-batch step (the loss is a per-row mean; this loss has no
    per-step noise, so both see identical inputs)."""
    tx, sched = loop.make_optimizer({"lr": 1e-3, "clip_grad_norm": 0.0})
    batch = _batch(8)
    outs = []
    for accum in (1, 2):
        step = jax.jit(loop.make_train_step(_zero_noise_loss(), tx, accum_steps=accum, lr_schedule=sched))
        trainable, mutable = loop._unboxed(task.init(jax.random.key(3), task.frozen))
        state0 = loop.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                                 mutable=mutable, ema=None, rng=jax.random.key_data(jax.random.key(1)))
        state, metrics = step(state0, task.frozen, batch)
        outs.append((_flat(state.trainable), float(metrics["grad_norm"]), float(metrics["loss"])))
    (pa, ga, la), (pb, gb, lb) = outs
    assert np.isclose(ga, gb, rtol=1e-5) and np.isclose(la, lb, rtol=1e-5)
    for k in pa:
        np.testing.assert_allclose(pb[k], pa[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert any(not np.allclose(v, _flat(trainable)[k]) for k, v in pa.items())


def _zero_noise_loss():
    from train.smoke import _model

    net, proj = _model()

    def loss_fn(trainable, frozen, mutable, batch, rng):
        pred = net.apply({"params": trainable}, proj.apply({"params": frozen}, batch["x"]))
        return jnp.mean(jnp.square(pred - batch["y"])), ({}, mutable)

    return loss_fn


def test_checkpoint_restores_onto_another_mesh(task, tmp_path):
    """Saved on data=2 × fsdp=4, restored on data=8 (and the Grain iterator resumes where it was)."""
    a = _trainer(task, tmp_path, MESH, ema_decay=0.5)  # the same step as test_fit_resume (compile cache)
    state = a.init_state()
    it = smoke_dataset(8)
    for _ in range(2):
        state, _ = a.train_step(state, next(it))
    manager = a.checkpoint_manager(with_data=True)
    a.save(manager, state, it, force=True)
    manager.wait_until_finished()
    expected_next = next(it)
    want = _flat(state)
    manager.close()

    b = _trainer(task, tmp_path, dict(data=8), ema_decay=0.5)
    it2 = smoke_dataset(8)
    manager = b.checkpoint_manager(with_data=True)
    assert manager.latest_step() == 2
    restored = b.restore(manager, it2)
    manager.close()
    got = _flat(restored)
    assert set(got) == set(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    assert state.trainable["ff_in"]["kernel"].sharding.mesh.shape["fsdp"] == 4
    restored_kernel = restored.trainable["ff_in"]["kernel"]
    assert restored_kernel.sharding.mesh.shape["data"] == 8 and restored_kernel.sharding.mesh.shape["fsdp"] == 1
    assert restored_kernel.addressable_shards[0].data.size == restored_kernel.size  # replicated on data=8
    np.testing.assert_array_equal(next(it2)["x"], expected_next["x"])
    meta = json.load(open(tmp_path / "checkpoints" / "2" / "meta" / "metadata"))
    assert meta["frozen_source"] == {"kind": "random", "seed": 100} and meta["mesh"]["fsdp"] == 4
    # only trainable params, their moments, the EMA, step, rng and mutable stats are stored: no frozen "proj"
    assert not any("proj" in k for k in want)


def test_fit_resume_is_bitwise_equal(task, tmp_path):
    """fit() to step 3, a new Trainer resumes to 5 = an uninterrupted 5-step run (params, opt state, EMA);
    TensorBoard scalars are written by process 0."""
    def run(workdir, stops):
        for s in stops:
            tr = _trainer(task, workdir, MESH, ema_decay=0.5)
            state = tr.fit(smoke_dataset(8), steps=s)
        return _flat(state)

    straight = run(tmp_path / "a", [5])
    resumed = run(tmp_path / "b", [3, 5])
    for k in straight:
        assert np.array_equal(straight[k], resumed[k]), k
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["3", "4", "5"]  # keep=3
    events = [f for f in os.listdir(tmp_path / "a" / "tb") if f.startswith("events.out.tfevents")]
    records = read_records(tmp_path / "a" / "tb" / events[0])
    assert b"brain.Event:2" in records[0]
    assert sum(b"train/loss" in r for r in records) == 5 and any(b"train/step_time_s" in r for r in records)


def test_optimizer_schedule_and_clip():
    tx, sched = loop.make_optimizer({"lr": 1.0, "clip_grad_norm": 1.0, "weight_decay": 0.0, "schedule": "cosine",
                                     "warmup_steps": 2, "decay_steps": 6})
    assert [round(float(sched(i)), 4) for i in (0, 1, 2, 4, 6)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.full(3, 100.0)}, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == 0.0  # step 0: lr 0
    with pytest.raises(ValueError, match="decay_steps"):
        loop.make_optimizer({"lr": 1.0, "schedule": "cosine", "warmup_steps": 5, "decay_steps": 2})


def test_config_file_and_overrides(tmp_path):
    defaults = {"model": {"base": "", "dtype": "bfloat16"}, "optimizer": {"lr": 1e-4, "clip": True},
                "train": {"steps": 10, "prompts": ["a"]}, "data": {}}
    f = tmp_path / "exp.yaml"
    f.write_text("optimizer:\n  lr: 5.0e-5\ndata:\n  path: /x\n")
    cfg = load_config(f, ["train.steps=20", "model.base=1.5", "optimizer.clip=false", 'train.prompts=["b", "c"]',
                          "data.shuffle=true"], defaults=defaults)
    assert cfg.optimizer.lr == 5e-5 and cfg.train.steps == 20 and cfg.model.base == "1.5"
    assert cfg.optimizer.clip is False and cfg.train.prompts == ["b", "c"] and cfg.data == {"path": "/x",
                                                                                           "shuffle": True}
    with pytest.raises(ConfigError, match="did you mean.*'steps'"):
        load_config(None, ["train.stepz=3"], defaults=defaults)
    with pytest.raises(ConfigError, match="expects an integer"):
        load_config(None, ["train.steps=abc"], defaults=defaults)
    # an exponent without a dot is a string to YAML 1.1; a number-valued key still reads it as the number
    assert load_config(None, ["optimizer.lr=1e-3"], defaults=defaults).optimizer.lr == 1e-3
    f.write_text("optimizer:\n  lr: 5E-4\n")
    assert load_config(f, [], defaults=defaults).optimizer.lr == 5e-4
    with pytest.raises(ConfigError, match="'optimizer.lr' expects a number, got 'fast'"):
        load_config(None, ["optimizer.lr=fast"], defaults=defaults)
    with pytest.raises(ConfigError, match="expects a finite number"):
        load_config(None, ["optimizer.lr=nan"], defaults=defaults)


def test_event_writer_format(tmp_path):
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    w = EventWriter(tmp_path)
    w.scalars(7, {"train/loss": 0.25})
    w.image("samples", np.zeros((4, 6, 3), np.uint8), 7)
    w.close()
    records = read_records(w.path)
    assert len(records) == 3
    # Event{wall_time=1 (double), step=2 (varint 7), summary=5{value=1{tag=1, simple_value=2 (float 0.25)}}}
    ev = records[1]
    assert ev[0] == 0x09 and ev[9:11] == bytes([0x10, 7])
    assert b"\x12\x0atrain/loss" not in ev and b"\x0a\x0atrain/loss\x15" + struct.pack("<f", 0.25) in ev
    assert b"\x89PNG" in records[2]
    # Reading back with protobuf's own parser (a dynamic message with the Event schema) gives the same values.
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="ev.proto", package="t")
    img = fdp.message_type.add(name="Image")
    for n, num, typ in (("height", 1, 5), ("width", 2, 5), ("colorspace", 3, 5), ("encoded", 4, 12)):
        img.field.add(name=n, number=num, type=typ, label=1)
    val = fdp.message_type.add(name="Value")
    val.field.add(name="tag", number=1, type=9, label=1)
    val.field.add(name="simple_value", number=2, type=2, label=1)
    val.field.add(name="image", number=4, type=11, type_name=".t.Image", label=1)
    summ = fdp.message_type.add(name="Summary")
    summ.field.add(name="value", number=1, type=11, type_name=".t.Value", label=3)
    event = fdp.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=1, label=1)
    event.field.add(name="step", number=2, type=3, label=1)
    event.field.add(name="file_version", number=3, type=9, label=1)
    event.field.add(name="summary", number=5, type=11, type_name=".t.Summary", label=1)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    Event = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Event"))
    first, scalar, image = (Event.FromString(r) for r in records)
    assert first.file_version == "brain.Event:2"
    assert scalar.step == 7 and scalar.summary.value[0].tag == "train/loss"
    assert scalar.summary.value[0].simple_value == 0.25
    assert (image.summary.value[0].image.height, image.summary.value[0].image.width) == (4, 6)


def test_shipped_configs_load():
    """Every experiment file in train/configs/ fits its stage's defaults (stage 0's: ``synthface.stage0``)."""
    import glob

    import importlib

    root = os.path.join(os.path.dirname(__file__), "..", "train", "configs")
    files = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert len(files) >= 3
    for f in files:
        name = os.path.basename(f)
        stage = next((s for s in ("infinite_id", "stage0", "stage2") if s in name),
                     "stage0" if name == "synthface_base.yaml" else "stage1")  # the shipped base: a stage-0 run
        module = "synthface.stage0" if stage == "stage0" else f"train.{stage}"  # stage 0 lives with the world
        defaults = importlib.import_module(module).DEFAULTS
        cfg = load_config(f, ["workdir=/tmp/x"], defaults=defaults)
        assert cfg.workdir == "/tmp/x" and (stage == "stage0" or cfg.optimizer.lr > 0)


def test_stage_defaults_are_yaml_files_beside_the_experiment_configs(tmp_path, monkeypatch):
    """Each stage's ``DEFAULTS`` is its file in ``train/configs/defaults/`` plus the shared ``training.yaml``
    sections; no default is a string that reads as a number (PyYAML reads ``1e-4`` as a string); a missing or
    clashing default file is a one-line ``ConfigError`` naming it."""
    import importlib

    from train import config as C

    shared = C.training_defaults()
    assert set(shared) == {"train", "optimizer", "checkpoint", "mesh"}
    for name in ("stage1", "stage2", "infinite_id"):
        module = importlib.import_module(f"train.{name}")
        with open(os.path.join(C.DEFAULTS_DIR, f"{name}.yaml"), encoding="utf-8") as f:
            own = yaml.safe_load(f)
        assert module.DEFAULTS == {**own, **shared}

    def numeric_strings(tree, where=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from numeric_strings(value, f"{where}{key}.")
            elif isinstance(value, str):
                try:
                    float(value)
                except ValueError:
                    continue
                yield f"{where}{key}={value!r}"

    for name in ("training", "stage1", "stage2", "infinite_id"):
        with open(os.path.join(C.DEFAULTS_DIR, f"{name}.yaml"), encoding="utf-8") as f:
            assert list(numeric_strings(yaml.safe_load(f))) == [], name
    assert isinstance(shared["optimizer"]["lr"], float) and isinstance(shared["optimizer"]["eps"], float)

    monkeypatch.setattr(C, "DEFAULTS_DIR", str(tmp_path))
    with pytest.raises(C.ConfigError, match="stage1.yaml is missing"):
        C.stage_defaults("stage1")
    (tmp_path / "training.yaml").write_text("train: {steps: 1}\n")
    (tmp_path / "stage1.yaml").write_text("workdir: ''\ntrain: {steps: 2}\n")
    with pytest.raises(C.ConfigError, match=r"redefines the shared sections \['train'\]"):
        C.stage_defaults("stage1")


def test_analytic_unet_flops():
    """The benchmark's analytic FLOP count reproduces the 401.6 GMACs of an SD1.5 UNet forward at 512² (77
    context tokens) of the performance reference, and scales with the latent area as expected."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from train_step import unet_forward_flops

    from dynamicid_jax.models.unet import unet_config

    cfg = unet_config("sd15")
    assert abs(unet_forward_flops(cfg, 64, 64, 77) / 2e9 - 401.6) < 0.1
    # 16× the area of a 16×16 latent costs less than one 64×64 forward: self-attention grows with L²
    assert 0.8 < unet_forward_flops(cfg, 16, 16) * 16 / unet_forward_flops(cfg, 64, 64) < 1.0
