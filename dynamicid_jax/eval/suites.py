"""The registry of evaluation suites that ``python -m infer.eval --suite NAME`` runs besides its built-in ``real``
suite. A world with its own references, prompts and scorer (the SynthFace demo world registers ``synthface``; see
:mod:`dynamicid_jax.plugins` for how a package's registrations are found) registers an :class:`EvalSuite`::

    from dynamicid_jax.eval.suites import EvalSuite, register_suite

    register_suite(EvalSuite("myworld", run=run_myworld, description="…"))

``run(*, sd, methods, dynamicid, infinite_id, pipes, log, **options)`` returns ``(results, grids)`` in the shape
``infer.eval`` reports (``{"suite", "protocol", "baselines", "methods", "targets", "seconds"[, "sizing"]}`` and
``{method: {kind: uint8 image}}``); ``options`` are the suite's own (for ``synthface``: ``data``, ``models``,
``quick``, ``protocol``, ``steps``, ``guidance_scale``, ``id_scale``, ``seed``). ``markdown_baselines`` optionally
writes the report's lines for the suite's baselines (and an extra table row, e.g. real images' own scores).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from dynamicid_jax.plugins import load_plugins

__all__ = ["EvalSuite", "register_suite", "get_suite", "available_suites", "format_value", "format_interval"]


@dataclasses.dataclass(frozen=True)
class EvalSuite:
    """One evaluation suite: ``run`` (see the module docstring), a one-line ``description``, and optionally
    ``markdown_baselines(results, columns) -> (extra table row or None, lines)``: ``columns`` are the report's
    ``(title, key path, interval?)`` columns, the extra row a ``(title, metrics-like dict)`` pair read by them."""

    name: str
    run: Callable[..., tuple[dict[str, Any], dict[str, dict[str, Any]]]]
    description: str = ""
    markdown_baselines: Callable[[dict[str, Any], Any], tuple[tuple[str, dict] | None, list[str]]] | None = None


_SUITES: dict[str, EvalSuite] = {}


def register_suite(suite: EvalSuite, *, overwrite: bool = False) -> None:
    """Make ``get_suite(suite.name)`` (and ``infer.eval --suite NAME``) find ``suite``."""
    if not isinstance(suite, EvalSuite):
        raise TypeError(f"register_suite: expected an EvalSuite, got {type(suite).__name__}")
    if not suite.name or not isinstance(suite.name, str):
        raise ValueError(f"suite name must be a non-empty string, got {suite.name!r}")
    if not callable(suite.run):
        raise TypeError(f"suite {suite.name!r}: run must be callable")
    if suite.name in _SUITES and not overwrite:
        raise ValueError(f"evaluation suite {suite.name!r} is already registered (pass overwrite=True to replace)")
    _SUITES[suite.name] = suite


def available_suites() -> list[str]:
    """Names of the registered suites (the installed plug-ins' included), sorted."""
    load_plugins()
    return sorted(_SUITES)


def get_suite(name: str) -> EvalSuite:
    """The suite registered as ``name`` (an unknown name loads the plug-ins first)."""
    if name not in _SUITES:
        load_plugins()
    if name not in _SUITES:
        known = ", ".join(available_suites()) or "none"
        raise ValueError(f"unknown evaluation suite {name!r}; registered: {known}")
    return _SUITES[name]


def format_value(v: Any) -> str:
    """A report cell: ``–`` for missing or non-finite, 3 decimals for floats."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def format_interval(ci: dict | None, digits: int = 2) -> str:
    """``estimate [low, high]`` of a bootstrap interval dict, ``–`` when there is none."""
    if not ci:
        return "–"
    return f"{ci['estimate']:.{digits + 1}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"
