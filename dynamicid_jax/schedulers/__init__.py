"""Pure-JAX diffusion schedulers (DDIM, DPM-Solver++ 2M, Euler) with diffusers' numerics.

A scheduler is a frozen, hashable dataclass (static under ``jax.jit``); ``set_timesteps(n)`` returns the
run's arrays as a pytree state; ``scale_model_input`` / ``step`` are pure functions of (state, arrays,
step index) and work inside ``lax.fori_loop``.

:func:`load_scheduler` turns a diffusers ``scheduler/`` folder or config dict into one of ours
(:data:`SCHEDULER_KINDS` names them for command lines).
"""
from __future__ import annotations

import json
import os
import types
from typing import Any, Mapping, Union

from .common import SchedulerConfigError
from .ddim import DDIMConfig, DDIMScheduler, DDIMState
from .dpm_solver import DPMSolverConfig, DPMSolverMultistepScheduler, DPMSolverState
from .euler import EulerConfig, EulerDiscreteScheduler, EulerState

SchedulerState = Union[DDIMState, DPMSolverState, EulerState]

__all__ = [
    "DDIMConfig", "DDIMScheduler", "DDIMState", "DPMSolverConfig", "DPMSolverMultistepScheduler", "DPMSolverState",
    "EulerConfig", "EulerDiscreteScheduler", "EulerState", "SCHEDULER_KINDS", "SD15_SCHEDULER_CONFIG", "Scheduler",
    "SchedulerConfigError", "SchedulerState", "load_scheduler", "read_scheduler_config",
]

Scheduler = Union[DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler]

SCHEDULER_KINDS: Mapping[str, type] = types.MappingProxyType({
    "ddim": DDIMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
})
_BY_CLASS_NAME = {cls.DIFFUSERS_CLASS: cls for cls in SCHEDULER_KINDS.values()}

# Stable Diffusion 1.5's noise schedule (its own folder ships a PNDMScheduler config with these values),
# written as the DDIM config DynamicID samples with. Read-only: copy with dict(...) to change it.
SD15_SCHEDULER_CONFIG: Mapping[str, Any] = types.MappingProxyType({
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
})


def read_scheduler_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads ``scheduler_config.json`` from a file, a ``scheduler/`` folder, or a model folder holding one."""
    path = os.fspath(path)
    candidates = [path] if path.endswith(".json") else [
        os.path.join(path, "scheduler_config.json"), os.path.join(path, "scheduler", "scheduler_config.json")]
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                cfg = json.load(f)
            if not isinstance(cfg, dict):
                raise SchedulerConfigError(f"{candidate}: expected a JSON object")
            return cfg
    raise FileNotFoundError(f"no scheduler config: looked for {' and '.join(candidates)}")


def load_scheduler(path_or_dict: str | os.PathLike | Mapping[str, Any], kind: str | None = None) -> Scheduler:
    """Builds a scheduler from a diffusers config.

    Without ``kind`` the config's ``_class_name`` must be DDIMScheduler, DPMSolverMultistepScheduler or
    EulerDiscreteScheduler. With ``kind`` ("ddim", "dpm++2m", "euler") that scheduler is built; from a config of
    another class (e.g. SD1.5's own PNDMScheduler) only the shared beta/timestep fields are taken.
    """
    cfg = dict(path_or_dict) if isinstance(path_or_dict, Mapping) else read_scheduler_config(path_or_dict)
    class_name = cfg.get("_class_name")
    if isinstance(class_name, str) and class_name.startswith("Flax"):
        class_name = class_name[len("Flax"):]
    choices = ", ".join(repr(k) for k in SCHEDULER_KINDS)
    if kind is None:
        if class_name not in _BY_CLASS_NAME:
            raise SchedulerConfigError(
                f"scheduler config _class_name={class_name!r} is not one we implement "
                f"({', '.join(_BY_CLASS_NAME)}); pass kind= one of {choices} to build that scheduler from the "
                f"shared beta/timestep fields of this config")
        return _BY_CLASS_NAME[class_name].from_config(cfg)
    if kind not in SCHEDULER_KINDS:
        raise ValueError(f"load_scheduler: kind={kind!r}: expected one of {choices}")
    return SCHEDULER_KINDS[kind].from_config(cfg)
