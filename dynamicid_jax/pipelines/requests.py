"""Checks every pipeline runs on a request before anything is compiled or detected.

* :func:`check_number` — a float parameter (guidance, id scale, boost, mix, eta, strengths) must be a finite
  number inside its range: ``nan`` would otherwise run as if guidance were off and ``inf`` would give a black image.
* :func:`check_request_size` — the batch and image size must fit: at most :data:`MAX_PROMPTS` prompts per call,
  and the estimated peak memory of the sampler (dominated by the attention scores of the finest attention grid,
  which XLA materialises) must fit the device's memory. The refusal names the estimate and the limit.

The limits and the reasons for them are listed in ``docs/errors_and_limits.md``.
"""
from __future__ import annotations

import math
import os
from typing import Any

from dynamicid_jax.errors import InputError, ResourceLimitError

__all__ = ["MAX_PROMPTS", "check_number", "check_prompts", "check_request_size", "device_memory_bytes",
           "estimate_sampler_bytes"]

#: prompts (= images) per pipeline call: every prompt is one row of one compiled batch; generate larger sets in
#: several calls. 64 keeps compile times and host memory of one call bounded on every backend we test.
MAX_PROMPTS = 64


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """``value`` as a float, refused unless finite and inside ``[low, high]`` (``(low, high]`` with
    ``low_open``); the message names the parameter, the value and the accepted range."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    accepted = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high is None else ']'}"
    if not math.isfinite(x):
        raise InputError(f"{name} must be a finite number in {accepted}, got {value!r}")
    if (low is not None and (x < low or (low_open and x == low))) or (high is not None and x > high):
        raise InputError(f"{name} must lie in {accepted}, got {value!r}")
    return x


def check_prompts(prompts: list[str], what: str = "prompt") -> None:
    if len(prompts) > MAX_PROMPTS:
        raise ResourceLimitError(f"{len(prompts)} {what}s in one call: at most {MAX_PROMPTS} (one image each); "
                                 f"generate larger sets in several calls")


def device_memory_bytes() -> tuple[int, str]:
    """``(bytes, what)``: the memory one sampler program may use — the accelerator's allocator limit, or the
    host's physical memory on CPU."""
    import jax

    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # backends without memory statistics (CPU) raise or return None
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{dev.platform.upper()} memory"
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "host memory"
    except (ValueError, OSError, AttributeError):
        return 1 << 62, "host memory"


def estimate_sampler_bytes(unet_config, latent_hw: tuple[int, int], rows: int, dtype_bytes: int = 4) -> int:
    """The largest attention-score tensor of one UNet call: ``rows × heads × L × L`` elements for the finest
    grid ``L = h·w`` that has attention (self-attention; the attention kernel on XLA materialises it)."""
    h, w = latent_hw
    heads = unet_config.heads_per_block
    heads = heads() if callable(heads) else heads
    best = 0
    for level, kind in enumerate(unet_config.down_block_types):
        if "CrossAttn" not in kind:
            continue
        cells = max(1, h >> level) * max(1, w >> level)
        best = max(best, rows * int(heads[level]) * cells * cells * dtype_bytes)
    if best == 0:  # attention only in the mid block
        level = len(unet_config.down_block_types) - 1
        cells = max(1, h >> level) * max(1, w >> level)
        best = rows * int(heads[-1]) * cells * cells * dtype_bytes
    return best


def check_request_size(unet_config, vae_factor: int, batch: int, height: int, width: int, *, guided: bool,
                       streams: int = 1, what: str = "request") -> None:
    """Refuse a request whose estimated peak memory (:func:`estimate_sampler_bytes`, rows = batch × 2 with
    guidance × ``streams``) exceeds the device memory, before compiling."""
    rows = batch * (2 if guided else 1) * streams
    need = estimate_sampler_bytes(unet_config, (height // vae_factor, width // vae_factor), rows)
    limit, where = device_memory_bytes()
    if need > limit:
        raise ResourceLimitError(
            f"{what} of {batch}×{height}×{width} needs about {_human(need)} for the attention of one UNet call, "
            f"more than the {_human(limit)} of {where}; lower height / width or the number of prompts")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"
