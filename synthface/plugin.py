"""What the SynthFace world adds to the library's public registries — the way any user's world plugs in
(:mod:`dynamicid_jax.plugins`): the ``synthetic`` face-analysis backend (:func:`dynamicid_jax.faces.register_backend`)
and the ``synthface`` evaluation suite (:func:`dynamicid_jax.eval.suites.register_suite`).

Importing ``synthface`` (or any of its modules) runs this once. The library finds it without that import through
the ``dynamicid_jax.plugins`` entry point in ``pyproject.toml`` (``synthface = "synthface.plugin"``), so
``--analyzer synthetic`` and ``--suite synthface`` work in every command line of an installed checkout; without an
install, set ``DYNAMICID_JAX_PLUGINS=synthface.plugin``. The factories import the models only when called.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from dynamicid_jax.eval.suites import EvalSuite, format_interval, format_value, register_suite
from dynamicid_jax.faces.analyzer import FaceAnalyzer, register_backend

__all__ = ["synthetic_analyzer", "run_suite", "markdown_baselines", "SUITE"]


def synthetic_analyzer(**kwargs: Any) -> FaceAnalyzer:
    """``get_analyzer("synthetic", models_dir=…, …)``: :class:`synthface.faces.backend.SyntheticAnalyzer`."""
    from synthface.faces.backend import SyntheticAnalyzer

    return SyntheticAnalyzer(**kwargs)


def run_suite(*, sd: str, methods, dynamicid: str | None, infinite_id: str | None, pipes: dict | None = None,
              log=print, data: str | None = None, models: str | None = None, quick: bool = False,
              protocol: Any = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``infer.eval --suite synthface``: :func:`synthface.evaluation.suite.run_synthface` on ``data`` / ``models``.
    ``protocol``: a :class:`~synthface.evaluation.suite.Protocol`, or a dict of overrides (``steps``,
    ``guidance_scale``, ``id_scale``, ``seed``, ``split``) of the full protocol (the quick one with
    ``quick=True``)."""
    from synthface.evaluation import suite as S

    if not data or not models:
        raise ValueError("--suite synthface needs --data (a SynthFace folder) and --models (its face models)")
    if not isinstance(protocol, S.Protocol):
        base = S.Protocol.quick() if quick else S.Protocol()
        protocol = dataclasses.replace(base, **(protocol or {}))
    return S.run_synthface(data, models, sd, dynamicid_path=dynamicid, infinite_id_path=infinite_id,
                           methods=methods, protocol=protocol, pipes=pipes, log=log)


def markdown_baselines(results: dict[str, Any], columns) -> tuple[tuple[str, dict] | None, list[str]]:
    """The report's row of real held-out images (the ceiling, read by the table's ``columns``) and the notes and
    baselines below the table."""
    b = results["baselines"]
    ci = b.get("ci", {})
    row = {"single": {"facesim": b.get("same_identity"), "detection_rate": b.get("detection_rate"),
                      "ci": {"facesim": ci.get("same_identity")}},
           "multi": {"placement": b.get("scene_placement")}, "attribute_accuracy": b.get("attribute_accuracy"),
           "edit": {"expression_accuracy": b.get("expression_accuracy_real"),
                    "ci": {"expression_accuracy": ci.get("expression_accuracy_real")}}}
    lines = ["", "Intervals: 95 % bootstrap, [low, high]. FaceSim: cosine of evaluation-recogniser embeddings "
             "(most similar detected face vs the reference; no face found = 0); *real held-out images*: other "
             "photos of the same person (the ceiling). Multi FaceSim L / R: the left / right person's matched "
             "FaceSim; placement: the matched face's centre lies in its identity's box. Expr: expression "
             "edits; Δ FaceSim = unedited control − edited (paired by seed). base (no ID): the SD base's own "
             "images for the same prompts and seeds (the generated-image chance level).", "", "## Baselines", ""]
    for key, text in (("same_identity", "same-identity ceiling (real images vs own reference)"),
                      ("different_identity", f"different-identity baseline (all {b.get('different_pairs')} "
                                             "identity pairs)"),
                      ("expression_accuracy_real", "expression classifier on real front views"),
                      ("expression_accuracy_round_trip", "… after the base's VAE round trip")):
        if key in b:
            lines.append(f"- {text}: {format_interval(ci.get(key)) if ci.get(key) else format_value(b[key])}")
    for key in ("images", "detection_rate", "attribute_accuracy", "scene_placement", "scene_faces"):
        if key in b:
            lines.append(f"- {key}: {format_value(b[key])}")
    return ("real held-out images", row), lines


SUITE = EvalSuite("synthface", run=run_suite, markdown_baselines=markdown_baselines,
                  description="the SynthFace demo world's protocol on the held-out identities of a SynthFace tree")

# A module body runs once per process, however often it is imported (the plug-in loader, ``import synthface``).
register_backend("synthetic", synthetic_analyzer, root_keyword="models_dir")
register_suite(SUITE)
