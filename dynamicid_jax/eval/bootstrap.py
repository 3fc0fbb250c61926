"""Bootstrap intervals for the evaluation's means, deterministic for a fixed seed.

Every headline number of the evaluation is a mean over *units* (a generated image, a placed face, an edit). Its
95 % interval is a percentile bootstrap:

* ``unit="image"`` (the default): the units are resampled **within their group** (stratified by identity, or by
  identity pair for two-person images), so every replicate keeps the protocol's balance of people. The interval
  says how much the number would move with other seeds and prompts for *these* held-out people — what the
  protocol's size controls, and the right unit when two rows are compared on the same people.
* ``unit="identity"``: whole groups are resampled (a cluster bootstrap) — how much the number would move with
  other held-out people. Reported beside the single-ID FaceSim as a second, wider interval.

Replicates are drawn from ``numpy.random.default_rng(seed)`` with the same seed for the same metric of every
method, and the same groups and sizes give the same resampling indices: the difference of two methods' replicate
arrays is therefore a **paired** bootstrap of their difference (:func:`difference`), which is how "clearly above"
is decided (the difference's interval lies above 0).

Sizing: a mean of ``n`` units with per-unit standard deviation ``sd`` (:func:`spread`: within groups for the
stratified intervals) has a 95 % half-width of about ``1.96·sd/√n``, so a half-width ``h`` needs
``n ≥ (1.96·sd/h)²`` units (:func:`required_units`); for a rate, ``sd ≤ 0.5`` gives the worst case ``n ≥ 97``
for ``h = 0.1``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Interval", "replicates", "interval", "spread", "difference", "required_units", "DEFAULT_BOOT", "Z95"]

DEFAULT_BOOT = 2000
Z95 = 1.959963984540054


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with its 95 % percentile-bootstrap interval, the number of units and their spread."""

    estimate: float
    low: float
    high: float
    n: int
    sd: float
    unit: str = "image"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def contains(self, value: float) -> bool:
        return self.low - 1e-12 <= value <= self.high + 1e-12

    def to_dict(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "half_width": self.half_width,
                "n": self.n, "sd": self.sd, "unit": self.unit}


def _groups(values: np.ndarray, groups: Sequence[Any] | None) -> list[np.ndarray]:
    if groups is None:
        return [values]
    g = np.asarray(groups)
    if len(g) != len(values):
        raise ValueError(f"bootstrap: {len(g)} group labels for {len(values)} values")
    _, inverse = np.unique(g, return_inverse=True)
    return [values[inverse == k] for k in range(int(inverse.max()) + 1)] if len(g) else []


def replicates(values: Sequence[float], groups: Sequence[Any] | None = None, *, unit: str = "image",
               n_boot: int = DEFAULT_BOOT, seed: int = 0) -> np.ndarray:
    """``[n_boot]`` bootstrap means of ``values`` (see the module docstring for ``unit``). Groups are taken in
    sorted label order, so equal inputs and seed give equal replicates."""
    v = np.asarray(values, np.float64).reshape(-1)
    if not len(v):
        raise ValueError("bootstrap: no values")
    if not np.all(np.isfinite(v)):
        raise ValueError("bootstrap: values must be finite")
    if unit not in ("image", "identity"):
        raise ValueError(f"bootstrap: unit must be 'image' or 'identity', got {unit!r}")
    rng = np.random.default_rng(seed)
    parts = _groups(v, groups)
    if unit == "image":
        total = np.zeros(n_boot)
        for part in parts:  # resample within each group, the group's size kept
            idx = rng.integers(0, len(part), (n_boot, len(part)))
            total += part[idx].sum(axis=1)
        return total / len(v)
    sums = np.array([p.sum() for p in parts])
    counts = np.array([len(p) for p in parts], np.float64)
    idx = rng.integers(0, len(parts), (n_boot, len(parts)))
    return sums[idx].sum(axis=1) / counts[idx].sum(axis=1)


def spread(values: Sequence[float], groups: Sequence[Any] | None = None, unit: str = "image") -> float:
    """The per-unit standard deviation that sets the interval's width: for ``unit="image"`` the pooled
    **within-group** spread (the between-group part is held fixed by the stratified resampling), so the
    half-width is ≈ ``1.96·spread/√n``; for ``unit="identity"`` the plain spread."""
    v = np.asarray(values, np.float64).reshape(-1)
    if len(v) < 2:
        return 0.0
    if unit != "image" or groups is None:
        return float(v.std(ddof=1))
    parts = _groups(v, groups)
    dof = sum(len(p) - 1 for p in parts)
    if dof <= 0:
        return 0.0
    return float(np.sqrt(sum(((p - p.mean()) ** 2).sum() for p in parts) / dof))


def interval(values: Sequence[float], groups: Sequence[Any] | None = None, *, unit: str = "image",
             n_boot: int = DEFAULT_BOOT, seed: int = 0, reps: np.ndarray | None = None) -> Interval:
    """The mean of ``values`` with its 95 % interval (``reps``: replicates already drawn for these values) and
    the per-unit :func:`spread`."""
    v = np.asarray(values, np.float64).reshape(-1)
    r = replicates(v, groups, unit=unit, n_boot=n_boot, seed=seed) if reps is None else np.asarray(reps)
    low, high = np.quantile(r, [0.025, 0.975])
    return Interval(float(v.mean()), float(low), float(high), int(len(v)), spread(v, groups, unit), unit)


def difference(estimate_a: float, reps_a: np.ndarray, estimate_b: float, reps_b: np.ndarray, n: int,
               unit: str = "image") -> Interval:
    """``a − b`` with the interval of the replicate differences (paired when both were drawn with the same seed,
    groups and sizes). ``sd`` is not defined for a difference of means and is reported as NaN."""
    d = np.asarray(reps_a, np.float64) - np.asarray(reps_b, np.float64)
    low, high = np.quantile(d, [0.025, 0.975])
    return Interval(float(estimate_a - estimate_b), float(low), float(high), int(n), math.nan, unit)


def required_units(sd: float, half_width: float) -> int:
    """Units needed for a 95 % half-width of ``half_width`` at per-unit spread ``sd``: ``⌈(1.96·sd/h)²⌉``."""
    if half_width <= 0:
        raise ValueError(f"half_width must be > 0, got {half_width!r}")
    return int(math.ceil((Z95 * max(float(sd), 0.0) / half_width) ** 2))
