"""Plug-ins (dynamicid_jax.plugins): the library finds the SynthFace world's ``synthetic`` backend and ``synthface``
suite through the installed entry point without importing the world itself, a module named in
``$DYNAMICID_JAX_PLUGINS`` registers a backend of its own, and a plug-in that fails to load is an error naming it.
Each case runs in a fresh interpreter (the plug-ins load once per process); a few seconds in all."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "DYNAMICID_JAX_PLUGINS"}  # only what the case names
    environ.update(PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path), os.environ.get("PYTHONPATH", "")]), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=environ, cwd=str(tmp_path), timeout=120)


def test_the_world_plugs_in_through_the_entry_point(tmp_path):
    """``get_analyzer("synthetic")``'s lookup loads ``synthface.plugin`` (the library never imports it by name):
    before the lookup no ``synthface`` module is loaded, after it the backend and the suite are registered."""
    done = _run("""
        import sys
        from dynamicid_jax.faces import analyzer
        from dynamicid_jax.eval import suites
        assert not any(m == "synthface" or m.startswith("synthface.") for m in sys.modules)
        assert "synthetic" not in analyzer._REGISTRY and "synthface" not in suites._SUITES
        try:
            analyzer.get_analyzer("synthetic", models_dir="/nonexistent-models")
        except FileNotFoundError as err:  # the factory ran: it looked for the models folder
            print("factory:", err)
        print(sorted(analyzer._REGISTRY), suites.available_suites())
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "factory:" in done.stdout and "/nonexistent-models" in done.stdout
    assert "['dlib', 'insightface', 'synthetic'] ['synthface']" in done.stdout


def test_a_module_named_in_the_environment_registers_a_backend(tmp_path):
    (tmp_path / "my_world_plugin.py").write_text(textwrap.dedent("""
        from dynamicid_jax.faces import register_backend

        class Mine:
            embedding_dim, num_landmarks = 3, 5
            def analyze(self, image):
                return []

        register_backend("mine", lambda **kw: Mine())
    """))
    done = _run("""
        from dynamicid_jax.faces import available_backends, get_analyzer
        print(type(get_analyzer("mine")).__name__, "mine" in available_backends())
    """, tmp_path, DYNAMICID_JAX_PLUGINS="my_world_plugin")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Mine", "True"]


@pytest.mark.parametrize("spec, reason", [("no_such_plugin_module", "ModuleNotFoundError"),
                                          ("my_broken_plugin", "RuntimeError: broken on purpose")])
def test_a_plugin_that_fails_to_load_is_an_error_naming_it(tmp_path, spec, reason):
    (tmp_path / "my_broken_plugin.py").write_text("raise RuntimeError('broken on purpose')\n")
    done = _run("""
        from dynamicid_jax.faces import get_analyzer
        from dynamicid_jax.plugins import PluginError
        try:
            get_analyzer("unknown-backend")
        except PluginError as err:
            print("PluginError:", err)
    """, tmp_path, DYNAMICID_JAX_PLUGINS=spec)
    assert done.returncode == 0, done.stderr
    assert f"PluginError: plug-in '{spec}' ($DYNAMICID_JAX_PLUGINS) could not be loaded" in done.stdout
    assert reason in done.stdout


def test_unknown_names_list_what_is_registered():
    from dynamicid_jax.eval.suites import get_suite
    from dynamicid_jax.faces import get_analyzer

    # other test files may register their own backends in this process: check the names this one relies on
    with pytest.raises(ValueError, match="unknown face-analysis backend 'nope'; registered: ") as err:
        get_analyzer("nope")
    registered = str(err.value).split("registered: ", 1)[1].split(", ")
    assert {"dlib", "insightface", "synthetic"} <= set(registered) and registered == sorted(registered)
    with pytest.raises(ValueError, match="unknown evaluation suite 'nope'; registered: ") as err:
        get_suite("nope")
    assert "synthface" in str(err.value).split("registered: ", 1)[1].split(", ")
