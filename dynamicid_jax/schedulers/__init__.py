"""Pure-JAX diffusion schedulers (DDIM, DPM-Solver++ 2M, Euler) with diffusers' numerics.

A scheduler is a frozen, hashable dataclass (static under ``jax.jit``); ``set_timesteps(n)`` returns the
run's arrays as a pytree state; ``scale_model_input`` / ``step`` are pure functions of (state, arrays,
step index) and work inside ``lax.fori_loop``.

:func:`load_scheduler` (in :mod:`.noise_schedule`) turns a diffusers ``scheduler/`` folder or config dict into one of ours
(:data:`SCHEDULER_KINDS` names them for command lines).
"""
from __future__ import annotations

import types
from typing import Mapping, Union

from .noise_schedule import (SD15_SCHEDULER_CONFIG, SchedulerConfigError, load_scheduler, read_scheduler_config,
                     scheduler_kinds)
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

SCHEDULER_KINDS: Mapping[str, type] = types.MappingProxyType(scheduler_kinds())
