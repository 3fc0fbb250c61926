"""The benchmarks' harness: the machine description, median timing, JSON results under results/."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import tempfile
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
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
    return path
