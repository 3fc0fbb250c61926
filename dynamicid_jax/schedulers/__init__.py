"""Pure-JAX diffusion schedulers (DDIM, DPM-Solver++ 2M, Euler) with diffusers' numerics.

A scheduler is a frozen, hashable dataclass (static under ``jax.jit``); ``set_timesteps(n)`` returns the
run's arrays as a pytree state; ``scale_model_input`` / ``step`` are pure functions of (state, arrays,
step index) and work inside ``lax.fori_loop``.
"""
from typing import Union

from .common import SchedulerConfigError
from .ddim import DDIMConfig, DDIMScheduler, DDIMState
from .dpm_solver import DPMSolverConfig, DPMSolverMultistepScheduler, DPMSolverState
from .euler import EulerConfig, EulerDiscreteScheduler, EulerState
from .loading import SCHEDULER_KINDS, SD15_SCHEDULER_CONFIG, Scheduler, load_scheduler, read_scheduler_config

SchedulerState = Union[DDIMState, DPMSolverState, EulerState]

__all__ = [
    "DDIMConfig", "DDIMScheduler", "DDIMState", "DPMSolverConfig", "DPMSolverMultistepScheduler", "DPMSolverState",
    "EulerConfig", "EulerDiscreteScheduler", "EulerState", "SCHEDULER_KINDS", "SD15_SCHEDULER_CONFIG", "Scheduler",
    "SchedulerConfigError", "SchedulerState", "load_scheduler", "read_scheduler_config",
]
