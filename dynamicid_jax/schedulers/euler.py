"""Euler (Karras et al. 2022, Alg. 2 without churn), numerically matching diffusers' ``EulerDiscreteScheduler``.

The sampler works in sigma space: the sample starts at ``noise · init_noise_sigma``, the model sees
``sample / sqrt(sigma² + 1)`` (:meth:`EulerDiscreteScheduler.scale_model_input`), and its timesteps are
float32 (fractional for ``linspace`` spacing and Karras sigmas), as in diffusers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp
import numpy as np
from flax import struct

from .noise_schedule import (BaseConfig, DDPMForwardProcess, SchedulerConfigError, check_bool, check_choice, check_float,
                     check_num_inference_steps, check_step_inputs, checked_timesteps,
                     karras_sigmas, sigma_to_t, train_sigmas)


@dataclasses.dataclass(frozen=True)
class EulerConfig(BaseConfig):
    """diffusers ``EulerDiscreteScheduler`` fields we implement (defaults are diffusers')."""

    use_karras_sigmas: bool = False
    sigma_min: float | None = None  # Karras range override (only used with use_karras_sigmas)
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"

    INERT: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "interpolation_type": ("linear",), "timestep_type": ("discrete",), "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
    }

    def __post_init__(self):
        super().__post_init__()
        if self.use_karras_sigmas is None:
            object.__setattr__(self, "use_karras_sigmas", False)
        check_bool("use_karras_sigmas", self.use_karras_sigmas)
        for name in ("sigma_min", "sigma_max"):
            if getattr(self, name) is not None:
                check_float(name, getattr(self, name), positive=True)
                object.__setattr__(self, name, float(getattr(self, name)))
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise SchedulerConfigError(f"scheduler config sigma_min={self.sigma_min} must be < "
                                       f"sigma_max={self.sigma_max}")
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))


@struct.dataclass
class EulerState:
    """Per-run arrays; index i is inference step i (diffusers order, noisiest first)."""

    timesteps: jnp.ndarray         # float32 [n] the model's t (fractional in general, as in diffusers)
    init_noise_sigma: jnp.ndarray  # float32 scalar
    sigmas: jnp.ndarray            # float32 [n + 1], the last one final (0 or sigma_min)

    @property
    def num_inference_steps(self) -> int:
        return self.timesteps.shape[0]


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler(DDPMForwardProcess):
    config: EulerConfig = EulerConfig()

    CONFIG: ClassVar[type] = EulerConfig
    DIFFUSERS_CLASS: ClassVar[str] = "EulerDiscreteScheduler"
    KIND: ClassVar[str] = "euler"
    ZERO_SNR_FLOOR: ClassVar[bool] = True

    def sigmas_and_timesteps(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(float32 sigmas [n + 1], float32 timesteps [n]) as diffusers' ``set_timesteps`` makes them."""
        c = self.config
        n = check_num_inference_steps(num_inference_steps, c.num_train_timesteps, self.sigmas_and_timesteps)
        big_t = c.num_train_timesteps
        if c.timestep_spacing == "linspace":
            ts = np.linspace(0, big_t - 1, n, dtype=np.float32)[::-1].copy()
        elif c.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.float32) + c.steps_offset
        else:  # trailing
            ts = np.arange(big_t, 0, -big_t / n).round().astype(np.float32) - 1
        sig = train_sigmas(c, self.ZERO_SNR_FLOOR)
        sigmas = np.interp(ts, np.arange(len(sig)), sig)
        if c.use_karras_sigmas:
            lo = c.sigma_min if c.sigma_min is not None else float(sigmas[-1])
            hi = c.sigma_max if c.sigma_max is not None else float(sigmas[0])
            sigmas = karras_sigmas(lo, hi, n)
            ts = sigma_to_t(sigmas, np.log(sig))
        final = float(sig[0]) if c.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [final]]).astype(np.float32)
        ts = checked_timesteps(np.asarray(ts).astype(np.float32), n, big_t, "EulerDiscreteScheduler.set_timesteps",
                               self.sigmas_and_timesteps)
        return sigmas, ts

    def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None) -> EulerState:
        """The state for a run of ``num_inference_steps`` (``sample_shape`` is accepted for a uniform API)."""
        del sample_shape  # Euler keeps no per-sample history
        sigmas, ts = self.sigmas_and_timesteps(num_inference_steps)
        max_sigma = np.float32(sigmas.max())
        if self.config.timestep_spacing in ("linspace", "trailing"):
            init = max_sigma
        else:
            init = np.sqrt(max_sigma ** 2 + np.float32(1))
        return EulerState(timesteps=jnp.asarray(ts, jnp.float32), init_noise_sigma=jnp.asarray(init, jnp.float32),
                          sigmas=jnp.asarray(sigmas, jnp.float32))

    def scale_model_input(self, state: EulerState, sample: jnp.ndarray, step_index) -> jnp.ndarray:
        """``sample / sqrt(sigma² + 1)``: the model sees a unit-variance input."""
        sigma = state.sigmas[step_index]
        return sample / (sigma ** 2 + 1) ** 0.5

    def step(self, state: EulerState, model_output: jnp.ndarray, step_index,
             sample: jnp.ndarray) -> tuple[jnp.ndarray, EulerState]:
        """One Euler step from sigmas[i] to sigmas[i + 1]."""
        model_output, sample = check_step_inputs(model_output, sample)
        sigma = state.sigmas[step_index]
        sigma_next = state.sigmas[step_index + 1]
        pred = self.config.prediction_type
        if pred == "epsilon":
            x0 = sample - sigma * model_output
        elif pred == "v_prediction":
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        else:  # sample
            x0 = model_output
        derivative = (sample - x0) / sigma
        return sample + derivative * (sigma_next - sigma), state
