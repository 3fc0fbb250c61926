"""The benchmarks' harness: the machine description, median timing, JSON results under results/."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable


def machine() -> dict:
    import jax

    dev = jax.devices()[0]
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "device": getattr(dev, "device_kind", str(dev)), "date": datetime.date.today().isoformat()}


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def write_result(result: dict, name: str, folder: str = os.path.join(os.path.dirname(__file__), "results")) -> str:
    from dynamicid_jax.file_io import write_json

    return write_json(result, os.path.join(folder, f"{name}.json"), indent=2)
