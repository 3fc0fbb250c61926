"""The targets of the SynthFace evaluation, each PASS / MISS from the numbers and their intervals, and the
protocol's sizing check.

"Clearly above" always means: the 95 % interval of the **paired** bootstrap difference (same identities,
prompts, seeds and resampling indices for both rows; :func:`dynamicid_jax.eval.bootstrap.difference`) lies
entirely above 0.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from dynamicid_jax.eval import bootstrap as B
from dynamicid_jax.eval.scores import HALF_WIDTH_LIMITS, HEADLINE

__all__ = ["synthface_targets", "protocol_sizing", "EXPR_FRACTION", "MAX_FACESIM_DROP", "PLACEMENT_BAR",
           "SIZING_RULE"]

EXPR_FRACTION = 0.8  # edits' Expr must reach this fraction of the classifier's accuracy on real round trips
MAX_FACESIM_DROP = 0.1
PLACEMENT_BAR = 0.9
SIZING_RULE = ("units needed for a 95 % half-width h at per-unit spread sd: n >= (1.96 sd / h)^2 "
               "(rates: sd <= 0.5, so n >= 97 for h = 0.10)")


def _get(tree: Any, *keys: str) -> Any:
    for k in keys:
        tree = tree.get(k) if isinstance(tree, dict) else None
    return tree


def _ci(results, method, part, name):
    if part is None:
        return _get(results, method, f"{name}_ci")
    return _get(results, method, part, "ci", name)


def _diff(results, reps, a: str, b: str, part: str | None, name: str) -> dict[str, Any] | None:
    """Paired difference ``a − b`` of one metric, or None where either is missing."""
    key = name if part is None else f"{part}.{name}"
    ra, rb = _get(reps, a, key), _get(reps, b, key)
    ca, cb = _ci(results, a, part, name), _ci(results, b, part, name)
    if ra is None or rb is None or ca is None or cb is None or len(ra) != len(rb):
        return None
    n = int(ca.get("n") or 0)
    return B.difference(ca["estimate"], ra, cb["estimate"], rb, n).to_dict()


def _target(name: str, rule: str, measured: dict[str, Any], passed: bool | None) -> dict[str, Any]:
    return {"target": name, "rule": rule, "measured": measured, "passed": None if passed is None else bool(passed)}


def _all(*parts: bool | None) -> bool | None:
    return None if any(p is None for p in parts) else all(parts)


def synthface_targets(results: dict[str, Any], baselines: dict[str, Any],
                      reps: dict[str, dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """The issue's targets (see the module docstring); ``passed`` is None where a number is not measured."""
    out = []
    lo_ci, hi_ci = _get(baselines, "ci", "different_identity"), _get(baselines, "ci", "same_identity")
    lo, hi = baselines.get("different_identity"), baselines.get("same_identity")

    f = _ci(results, "dynamicid", "single", "facesim")
    bar = None if lo is None or hi is None else lo + 0.5 * (hi - lo)
    vs_base = _diff(results, reps, "dynamicid", "base", "single", "facesim")
    out.append(_target(
        "single-ID identity",
        "DynamicID single-ID FaceSim >= different-identity baseline + 1/2 (same-identity ceiling - baseline), and "
        "clearly above the base model's own images (no ID): the 95 % interval of the paired difference "
        "DynamicID - base (no ID) lies above 0",
        {"facesim": f, "bar": bar, "baseline": lo_ci, "ceiling": hi_ci,
         "base_no_id": _ci(results, "base", "single", "facesim"), "dynamicid_minus_base": vs_base},
        _all(None if f is None or bar is None else f["estimate"] >= bar,
             None if vs_base is None else vs_base["low"] > 0)))

    p = _ci(results, "dynamicid", "multi", "placement")
    sides = {k: _ci(results, "dynamicid", "multi", k) for k in ("facesim_left", "facesim_right")}
    out.append(_target(
        "two identities in one image",
        f"DynamicID: each identity recognised inside its own box (placement) >= {PLACEMENT_BAR:.2f}, and the "
        "matched FaceSim of both faces (left and right) above the different-identity baseline (the lower end of "
        "each face's 95 % interval above the baseline)",
        {"placement": p, **sides, "baseline": lo_ci},
        _all(None if p is None else p["estimate"] >= PLACEMENT_BAR,
             *[None if v is None or lo is None else v["low"] > lo for v in sides.values()])))

    e, d = _ci(results, "dynamicid", "edit", "expression_accuracy"), _ci(results, "dynamicid", "edit",
                                                                         "facesim_drop")
    real = baselines.get("expression_accuracy_round_trip")
    expr_bar = None if real is None else EXPR_FRACTION * real
    out.append(_target(
        "IMR edits",
        f"DynamicID expression accuracy of edits >= {EXPR_FRACTION} x the classifier's accuracy on real held-out "
        f"front views of the same expressions after the base's VAE round trip, and FaceSim drop (unedited - "
        f"edited) <= {MAX_FACESIM_DROP}",
        {"expression_accuracy": e, "bar": expr_bar,
         "classifier_on_real_round_trip": _get(baselines, "ci", "expression_accuracy_round_trip"),
         "facesim_drop": d},
        _all(None if e is None or expr_bar is None else e["estimate"] >= expr_bar,
             None if d is None else d["estimate"] <= MAX_FACESIM_DROP)))

    imr = _diff(results, reps, "dynamicid", "no-imr", "edit", "expression_accuracy")
    out.append(_target(
        "ablation w/o IMR",
        "w/o IMR loses expression control: DynamicID's expression accuracy clearly above w/o IMR's (paired "
        "difference's 95 % interval above 0)",
        {"dynamicid": e, "no-imr": _ci(results, "no-imr", "edit", "expression_accuracy"),
         "dynamicid_minus_no_imr": imr},
        None if imr is None else imr["low"] > 0))

    attr = _diff(results, reps, "dynamicid", "no-saa", None, "attribute_accuracy")
    place = _diff(results, reps, "dynamicid", "no-saa", "multi", "placement")
    out.append(_target(
        "ablation w/o SAA",
        "w/o SAA loses prompt attributes and placement: DynamicID's attribute accuracy and multi-ID placement "
        "both clearly above w/o SAA's (paired differences' 95 % intervals above 0)",
        {"attributes_dynamicid_minus_no_saa": attr, "placement_dynamicid_minus_no_saa": place,
         "no-saa_attributes": _ci(results, "no-saa", None, "attribute_accuracy"),
         "no-saa_placement": _ci(results, "no-saa", "multi", "placement")},
        _all(None if attr is None else attr["low"] > 0, None if place is None else place["low"] > 0)))
    return out


def protocol_sizing(results: dict[str, Any], method: str = "dynamicid") -> dict[str, Any]:
    """Per headline metric of ``method``: units, per-unit spread, achieved half-width, the limit, the units the
    limit needs at the measured spread, and whether the protocol was large enough."""
    rows = {}
    for (part, name), limit_key in HEADLINE:
        ci = _ci(results, method, part, name)
        if ci is None:
            continue
        limit = HALF_WIDTH_LIMITS[limit_key]
        rows[f"{part}.{name}"] = {"units": ci["n"], "sd": ci["sd"], "half_width": ci["half_width"],
                                  "limit": limit, "units_needed": B.required_units(ci["sd"], limit),
                                  "enough": bool(ci["half_width"] <= limit)}
    return {"method": method, "rule": SIZING_RULE, "metrics": rows}
