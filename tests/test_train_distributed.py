"""Scale-out of the train loop with JAX's own runtime: two real processes on localhost, and kill -9 / resume.

Both run ``python -m train.smoke`` (train/smoke.py) in subprocesses. Slow (each process imports JAX and
compiles): run with ``make test-slow``.
"""
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".cache" / "jax")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _smoke(args, devices, log_path):
    """Start ``python -m train.smoke``; its output goes to a file (a pipe could fill up and block a process
    that its peer waits for in a collective)."""
    out = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "train.smoke", *map(str, args)], cwd=ROOT, env=_env(devices),
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log_path
    out.close()
    return proc


def _output(proc) -> str:
    return pathlib.Path(proc.log_path).read_text()[-4000:]


def _wait(proc, timeout=500):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"train.smoke did not finish in {timeout} s:\n{_output(proc)}") from None
    assert proc.returncode == 0, f"train.smoke exited with {proc.returncode}:\n{_output(proc)}"
    return _output(proc)


@pytest.fixture
def tmp_path():
    """A private temporary folder (not pytest's tmp_path: other pytest sessions on the machine may prune the
    shared base folder while these subprocesses still write to it)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="dynamicid_train_"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_two_processes_equal_one(tmp_path):
    """2 processes × 2 CPU devices (gloo collectives, coordinator on 127.0.0.1), mesh data=2 × fsdp=2, 3 steps:
    both processes end with identical params, equal to one process × 4 devices fed the same global batches."""
    port = _free_port()
    common = ["--steps", 3, "--global-batch", 8, "--fsdp", 2, "--checkpoint-every", 3]
    procs = [_smoke(common + ["--workdir", tmp_path / "multi", "--coordinator", f"127.0.0.1:{port}",
                              "--num-processes", 2, "--process-id", i, "--save-params", tmp_path / "multi.npz"],
                    2, tmp_path / f"multi{i}.log") for i in range(2)]
    single = _smoke(common + ["--workdir", tmp_path / "single", "--emulate-processes", 2,
                              "--save-params", tmp_path / "single.npz"], 4, tmp_path / "single.log")
    for p in procs + [single]:
        _wait(p)
    p0, p1, ref = _load(tmp_path / "multi.p0.npz"), _load(tmp_path / "multi.p1.npz"), _load(tmp_path / "single.npz")
    assert set(p0) == set(ref) and len(ref) >= 8
    for k in ref:
        assert np.array_equal(p0[k], p1[k]), k
        np.testing.assert_allclose(p0[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # the 2-process checkpoint holds one Grain iterator state per process
    data = tmp_path / "multi" / "checkpoints" / "3" / "data"
    assert sorted(f for f in os.listdir(data) if f.startswith("process_")) == ["process_0-of-2.json",
                                                                                "process_1-of-2.json"]


def _complete_checkpoints(ckdir: pathlib.Path) -> list[int]:
    """Step directories (integer names) — each must be whole: the manager's metadata and every item."""
    steps = []
    for d in ckdir.iterdir() if ckdir.exists() else []:
        if d.name.isdigit():
            for item in ("_CHECKPOINT_METADATA", "state", "data", "config", "meta"):
                assert (d / item).exists(), f"checkpoint {d.name} lacks {item}: {sorted(os.listdir(d))}"
            assert (d / "state" / "_METADATA").exists() or any((d / "state").iterdir())
            steps.append(int(d.name))
    return sorted(steps)


def test_kill_and_resume_is_bitwise_equal(tmp_path):
    """Start training, kill -9 at a random step (three times), resume each time: the final params are bitwise
    equal to an uninterrupted run, and no step directory is ever half-written."""
    steps = 14
    common = ["--steps", steps, "--global-batch", 8, "--fsdp", 2, "--checkpoint-every", 1, "--ema", 0.9]
    ref = _smoke(common + ["--workdir", tmp_path / "ref", "--save-params", tmp_path / "ref.npz"], 4,
                 tmp_path / "ref.log")
    _wait(ref)

    rng = random.Random(1234)
    workdir, log = tmp_path / "killed", tmp_path / "steps.log"
    kills = []
    for _ in range(3):
        done_before = int(log.read_text().split()[-1]) if log.exists() and log.read_text().split() else 0
        target = min(done_before + rng.randint(1, 4), steps - 1)
        proc = _smoke(common + ["--workdir", workdir, "--step-log", log], 4, tmp_path / f"run{len(kills)}.log")
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            text = log.read_text().split() if log.exists() else []
            if text and int(text[-1]) >= target:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"train.smoke finished before the kill:\n{_output(proc)}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(int(log.read_text().split()[-1]))
        _complete_checkpoints(workdir / "checkpoints")
    final = _smoke(common + ["--workdir", workdir, "--step-log", log, "--save-params", tmp_path / "resumed.npz"],
                   4, tmp_path / "final.log")
    out = _wait(final)
    got, want = _load(tmp_path / "resumed.npz"), _load(tmp_path / "ref.npz")
    assert set(got) == set(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), f"{k} differs after resuming (kills at {kills})"
    assert _complete_checkpoints(workdir / "checkpoints")[-1] == steps
    logged = [int(s) for s in log.read_text().split()]
    assert len(kills) == 3 and all(k < steps for k in kills) and logged[-1] == steps, (kills, out[-500:])
