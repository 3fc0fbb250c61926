"""DDIM (Song et al. 2021), numerically matching diffusers' ``DDIMScheduler``.

η = 0 is the deterministic sampler DynamicID uses (50 steps). η > 0 adds ``std_t · noise`` with noise drawn
from a ``key`` passed to :meth:`DDIMScheduler.step`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .noise_schedule import (BaseConfig, DDPMForwardProcess, alphas_cumprod, check_bool, check_float,
                     check_num_inference_steps, check_step_inputs, checked_timesteps,
                     x0_from_model_output)


@dataclasses.dataclass(frozen=True)
class DDIMConfig(BaseConfig):
    """diffusers ``DDIMScheduler`` fields we implement (defaults are diffusers')."""

    timestep_spacing: str = "leading"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True

    INERT: ClassVar[Mapping[str, tuple[Any, ...]]] = {"thresholding": (False,)}

    def __post_init__(self):
        super().__post_init__()
        check_bool("clip_sample", self.clip_sample)
        check_float("clip_sample_range", self.clip_sample_range, positive=True)
        check_bool("set_alpha_to_one", self.set_alpha_to_one)


@struct.dataclass
class DDIMState:
    """Per-run arrays; index i is inference step i (diffusers order, noisiest first)."""

    timesteps: jnp.ndarray          # int32 [n] the model's t
    init_noise_sigma: jnp.ndarray   # float32 scalar (1 for DDIM)
    alpha_prod_t: jnp.ndarray       # float32 [n] alpha_bar at t
    alpha_prod_t_prev: jnp.ndarray  # float32 [n] alpha_bar at the previous t (or the final alpha)
    variance: jnp.ndarray           # float32 [n] sigma_t^2 / eta^2 of the DDIM paper (eq. 16)

    @property
    def num_inference_steps(self) -> int:
        return self.timesteps.shape[0]


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(DDPMForwardProcess):
    config: DDIMConfig = DDIMConfig()

    CONFIG: ClassVar[type] = DDIMConfig
    DIFFUSERS_CLASS: ClassVar[str] = "DDIMScheduler"
    KIND: ClassVar[str] = "ddim"
    ZERO_SNR_FLOOR: ClassVar[bool] = False

    def timesteps_for(self, num_inference_steps: int) -> np.ndarray:
        """The int64 timesteps diffusers' ``set_timesteps`` gives (host NumPy)."""
        c = self.config
        n = check_num_inference_steps(num_inference_steps, c.num_train_timesteps, self.timesteps_for)
        big_t = c.num_train_timesteps
        if c.timestep_spacing == "linspace":
            ts = np.linspace(0, big_t - 1, n).round()[::-1].astype(np.int64)
        elif c.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.int64) + c.steps_offset
        else:  # trailing
            ts = np.round(np.arange(big_t, 0, -big_t / n)).astype(np.int64) - 1
        return checked_timesteps(ts, n, big_t, "DDIMScheduler.set_timesteps", self.timesteps_for)

    def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] | None = None) -> DDIMState:
        """The state for a run of ``num_inference_steps`` (``sample_shape`` is accepted for a uniform API)."""
        del sample_shape  # DDIM keeps no per-sample history
        c = self.config
        ts = self.timesteps_for(num_inference_steps)
        ac = alphas_cumprod(c, self.ZERO_SNR_FLOOR).astype(np.float64)
        final = 1.0 if c.set_alpha_to_one else ac[0]
        # diffusers steps back by num_train // n whatever the spacing
        prev = ts - c.num_train_timesteps // len(ts)
        a_t = ac[ts]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        return DDIMState(timesteps=jnp.asarray(ts, jnp.int32), init_noise_sigma=f32(1.0), alpha_prod_t=f32(a_t),
                         alpha_prod_t_prev=f32(a_prev), variance=f32(variance))

    def scale_model_input(self, state: DDIMState, sample: jnp.ndarray, step_index) -> jnp.ndarray:
        """DDIM feeds the sample to the model unscaled."""
        del state, step_index
        return sample

    def step(self, state: DDIMState, model_output: jnp.ndarray, step_index, sample: jnp.ndarray, *,
             eta: float = 0.0, key: jax.Array | None = None) -> tuple[jnp.ndarray, DDIMState]:
        """One DDIM update x_t → x_{t-1}. ``eta`` (a Python float) > 0 needs ``key`` for the added noise."""
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or eta < 0:
            raise ValueError(f"DDIMScheduler.step: eta must be a Python float >= 0, got {eta!r}")
        if eta > 0 and key is None:
            raise ValueError("DDIMScheduler.step: eta > 0 adds noise, so a PRNG `key` is required")
        if eta == 0 and key is not None:
            raise ValueError("DDIMScheduler.step: `key` is only used with eta > 0")
        c = self.config
        model_output, sample = check_step_inputs(model_output, sample)
        a_t = state.alpha_prod_t[step_index]
        a_prev = state.alpha_prod_t_prev[step_index]
        b_t = 1 - a_t
        x0 = x0_from_model_output(c.prediction_type, model_output, sample, a_t ** 0.5, b_t ** 0.5)
        if c.prediction_type == "epsilon":
            eps = model_output
        elif c.prediction_type == "sample":
            eps = (sample - a_t ** 0.5 * x0) / b_t ** 0.5
        else:  # v_prediction
            eps = a_t ** 0.5 * model_output + b_t ** 0.5 * sample
        if c.clip_sample:
            x0 = jnp.clip(x0, -c.clip_sample_range, c.clip_sample_range)
        if eta > 0:
            std = eta * state.variance[step_index] ** 0.5
            prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
            prev = prev + std * jax.random.normal(key, sample.shape, jnp.float32)
        else:
            prev = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        return prev, state
