"""Plug-ins: packages that add entries to the library's registries — face-analysis backends
(:func:`dynamicid_jax.faces.register_backend`) and evaluation suites (:func:`dynamicid_jax.eval.register_suite`).

A plug-in is a module that registers what it provides when it is imported. The SynthFace demo world (the
``synthface`` package of this repository) is one: it adds the ``synthetic`` backend and the ``synthface`` suite, and
the library knows nothing else about it. Your own world or face detector plugs in the same way:

1. **Installed packages** declare the module in the entry-point group ``dynamicid_jax.plugins`` of their
   ``pyproject.toml``::

       [project.entry-points."dynamicid_jax.plugins"]
       myworld = "myworld.plugin"          # a module that registers on import
       # or "myworld.plugin:register" — a function called once, with no arguments

2. **Modules that are not installed** (a script beside your data, a checkout on ``PYTHONPATH``): name them in the
   environment variable ``DYNAMICID_JAX_PLUGINS`` (comma-separated module names), or call :func:`load_plugin`.

A registry asked for a name it does not know (``get_analyzer("synthetic")``, ``--analyzer synthetic``,
``--suite synthface``) or for the list of its names loads every plug-in once (:func:`load_plugins`) before it
answers, so the command lines need no extra flag. A plug-in that fails to import is an error naming it, never
skipped silently.
"""
from __future__ import annotations

import importlib
import os
import threading
from importlib import metadata

__all__ = ["ENTRY_POINT_GROUP", "ENV_VAR", "PluginError", "load_plugin", "load_plugins", "loaded_plugins"]

ENTRY_POINT_GROUP = "dynamicid_jax.plugins"
ENV_VAR = "DYNAMICID_JAX_PLUGINS"

_LOCK = threading.RLock()
_LOADED: dict[str, str] = {}  # spec → where it was named (entry point / environment / load_plugin)
_SCANNED = False


class PluginError(ImportError):
    """A plug-in named by an entry point, ``DYNAMICID_JAX_PLUGINS`` or :func:`load_plugin` could not be loaded."""


def load_plugin(spec: str, *, source: str = "load_plugin") -> None:
    """Import plug-in ``spec`` (``"package.module"`` or ``"package.module:function"``; the function is called with
    no arguments) unless it is loaded already. ``source`` names where the spec came from, for the error."""
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"plug-in: expected a module name like 'mypackage.plugin', got {spec!r} ({source})")
    spec = spec.strip()
    with _LOCK:
        if spec in _LOADED:
            return
        _LOADED[spec] = source  # before importing: a plug-in that asks a registry for its names does not recurse
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
            if attr:
                hook = getattr(module, attr)
                if not callable(hook):
                    raise TypeError(f"{spec} is not a function")
                hook()
        except Exception as err:
            del _LOADED[spec]
            raise PluginError(f"plug-in {spec!r} ({source}) could not be loaded: {type(err).__name__}: {err}") \
                from err


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def load_plugins() -> list[str]:
    """Load every installed plug-in (entry points of :data:`ENTRY_POINT_GROUP`) and every module named in
    ``$DYNAMICID_JAX_PLUGINS``, once per process; returns the specs loaded so far."""
    global _SCANNED
    with _LOCK:
        if not _SCANNED:
            _SCANNED = True
            try:
                for ep in _entry_points():
                    load_plugin(ep.value, source=f"entry point {ep.name!r} of {ENTRY_POINT_GROUP}")
                for name in os.environ.get(ENV_VAR, "").split(","):
                    if name.strip():
                        load_plugin(name, source=f"${ENV_VAR}")
            except PluginError:
                _SCANNED = False  # the next lookup reports it again instead of running without the plug-in
                raise
        return loaded_plugins()


def loaded_plugins() -> list[str]:
    """The plug-in specs imported so far, in load order."""
    with _LOCK:
        return list(_LOADED)
