"""The top-level package: both method pipelines import from ``dynamicid_jax`` beside ``StableDiffusion``, lazily
(a plain ``import dynamicid_jax`` does not load them), and unknown names still raise ``AttributeError``."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import dynamicid_jax
from dynamicid_jax.pipelines.dynamicid import DynamicIDPipeline as _DynamicIDPipeline
from dynamicid_jax.pipelines.infinite_id import InfiniteIDPipeline as _InfiniteIDPipeline


def test_method_pipelines_at_top_level():
    from dynamicid_jax import DynamicIDPipeline, InfiniteIDPipeline, StableDiffusion

    assert DynamicIDPipeline is _DynamicIDPipeline
    assert InfiniteIDPipeline is _InfiniteIDPipeline
    assert StableDiffusion is dynamicid_jax.pipelines.stable_diffusion.StableDiffusion
    for name in ("DynamicIDPipeline", "InfiniteIDPipeline"):
        assert name in dynamicid_jax.__all__ and name in dir(dynamicid_jax)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchPipeline'"):
        dynamicid_jax.NoSuchPipeline  # noqa: B018
    assert all(hasattr(dynamicid_jax, name) for name in dynamicid_jax.__all__)


def test_plain_import_does_not_load_the_method_pipelines():
    """In a fresh interpreter (this process has imported them already): the pipelines load only when asked for."""
    code = textwrap.dedent("""
        import sys
        import dynamicid_jax
        lazy = ("dynamicid_jax.pipelines.dynamicid", "dynamicid_jax.pipelines.infinite_id")
        assert not [m for m in lazy if m in sys.modules], [m for m in lazy if m in sys.modules]
        from dynamicid_jax import DynamicIDPipeline
        assert "dynamicid_jax.pipelines.dynamicid" in sys.modules
        assert DynamicIDPipeline.__module__ == "dynamicid_jax.pipelines.dynamicid"
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
