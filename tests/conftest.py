"""Test-session setup: offline hub, 8 virtual CPU devices, a persistent JAX compilation cache."""
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# The suite's models are tiny: XLA's CPU compile, not the run, is most of its time, and LLVM's optimisation is the
# part of the compile that a test never gets back.
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402  (after the environment above)

_cache = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax"
_cache.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dynamicid_jax.plugins import load_plugins  # noqa: E402

# The installed plug-ins (the SynthFace world's "synthetic" backend and "synthface" suite) load once per process, on
# the first lookup of an unknown name. Load them now, before a test swaps a registry for a copy (test_faces'
# test_registry): a first load into that copy would be lost with it for every later test of the worker.
load_plugins()


@pytest.fixture(scope="session")
def torch():
    """The PyTorch reference oracle (CPU, fp32, deterministic)."""
    import torch as _torch

    _torch.manual_seed(0)
    _torch.set_num_threads(2)
    return _torch


def assert_close(actual, expected, atol=1e-4, rtol=1e-4, what=""):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    bound = atol + rtol * np.abs(expected)
    worst = float(np.max(err - bound)) if err.size else 0.0
    assert worst <= 0, f"{what}: max abs diff {float(err.max()):.3e} exceeds atol={atol}, rtol={rtol}"


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory, torch):
    """A tiny random Stable Diffusion in the diffusers folder format (see tests/tiny_sd.py)."""
    from tiny_sd import make_tiny_sd

    return make_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """``python -m synthface.demo --quick`` run once: tests/test_demo.py checks its files, tests/test_stage0.py reuses
    its stage-0 folder (SHARED_FIXTURE_GROUPS keeps both modules on one xdist worker, so it runs once)."""
    from synthface import demo

    out = tmp_path_factory.mktemp("demo_out")
    assert demo.main(["--out", str(out), "--quick"]) == 0
    return out


# ``make test`` runs ``pytest -n 2 --dist loadfile``: one test module is one unit of work for a worker, except that
# modules sharing a session fixture form one unit (a session fixture runs once per worker). The quick demo, the
# longest unit, is handed out first. (xdist's own ``xdist_group`` marks rely on rewriting node ids, which pytest 9.2
# no longer allows, so the grouping lives here.)
SHARED_FIXTURE_GROUPS = {"tests/test_demo.py": "quick_demo", "tests/test_stage0.py": "quick_demo"}
FIRST_GROUP = "quick_demo"


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModuleGroupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SHARED_FIXTURE_GROUPS.get(module, module)

        def _assign_work_unit(self, node) -> None:
            if FIRST_GROUP in self.workqueue:
                self.workqueue.move_to_end(FIRST_GROUP, last=False)
            super()._assign_work_unit(node)

    return ModuleGroupScheduling(config, log)


#: Every test file in exactly one group, so that a reader sees the kinds of evidence apart and can run one kind
#: (``pytest -m parity``; ``make test-slow`` runs the ``slow`` ones of every group). docs/development.md explains
#: each group. A test file that is in no group, or in two, stops the collection with an error naming it.
TEST_GROUPS: dict[str, tuple[str, ...]] = {
    # our model / scheduler / tokenizer / method code against an independent reference (diffusers, transformers,
    # a PyTorch re-expression of the official modules, OpenCLIP's tokenizer, NumPy), on random weights
    "parity": ("test_clip.py", "test_id_encoder.py", "test_imr.py", "test_infinite_id.py", "test_pipeline.py",
               "test_saa.py", "test_schedulers.py", "test_sdxl.py", "test_sdxl_slow.py", "test_single_file.py",
               "test_tokenizer.py", "test_unet.py", "test_vae.py", "test_convert.py"),
    # one module's behaviour on inputs with known answers: data records, face geometry and backends, the
    # importers' safe loading, sharding rules, the train loop's guarantees, the stage tasks, SynthFace's parts
    "unit": ("test_data_schema.py", "test_face_weighted_loss.py", "test_faces.py", "test_faces_insightface.py",
             "test_official_import.py", "test_sharding.py", "test_sdxl_methods.py", "test_synthface.py",
             "test_synthface_models.py", "test_train_loop.py", "test_train_stages.py", "test_plugins.py",
             "test_eval_metrics.py"),
    # a user's path end to end: command lines, pipelines from folders to PNGs, shards → training → export, the
    # demo, the evaluation, the web app, multi-process training, and every bad input's one-line error
    "end_to_end": ("test_app.py", "test_app_methods.py", "test_bad_inputs.py", "test_bad_inputs_library.py",
                   "test_cli_generate.py", "test_data_real.py", "test_data_shards.py", "test_demo.py",
                   "test_dynamicid_pipeline.py", "test_eval.py", "test_infinite_id_pipeline.py",
                   "test_sdxl_pipelines.py", "test_sdxl_train.py", "test_stage0.py", "test_train_distributed.py",
                   "test_train_synthface.py", "test_walks.py"),
    # the repository itself: import layering, undefined names, documentation links, the public names, the shipped
    # SynthFace base against its provenance
    "repository": ("test_docs.py", "test_layering.py", "test_public_api.py", "test_static.py",
                   "test_synthface_base.py"),
}


def _group_of_file() -> dict[str, str]:
    out: dict[str, str] = {}
    for group, files in TEST_GROUPS.items():
        for name in files:
            if name in out:
                raise pytest.UsageError(f"tests/{name} is in two groups of TEST_GROUPS: {out[name]} and {group}")
            out[name] = group
    return out


def pytest_collection_modifyitems(config, items):
    """Mark each test with its file's group (``pytest -m unit``); a file in no group is a collection error."""
    groups = _group_of_file()
    for item in items:
        name = item.path.name
        if name not in groups:
            raise pytest.UsageError(f"tests/{name} is in no group: add it to TEST_GROUPS in tests/conftest.py")
        item.add_marker(getattr(pytest.mark, groups[name]))

