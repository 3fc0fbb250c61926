"""DPM-Solver++ (Lu et al. 2022) multistep, order ≤ 2, numerically matching diffusers'
``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"`` (the "DPM++ 2M" sampler).

Every step is ``x_next = c_sample·x + c_x0·D0 + c_diff·(D0 − D0_prev)`` with ``D0`` the data prediction;
the three coefficients per step (and whether a step is first or second order) depend only on the sigma
grid, so :meth:`set_timesteps` tabulates them on the host in float64. The state carries ``D0_prev``, which
is why the sample shape must be given to :meth:`DPMSolverMultistepScheduler.set_timesteps`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp
import numpy as np
from flax import struct

from .noise_schedule import (BaseConfig, DDPMForwardProcess, SchedulerConfigError, alphas_cumprod, check_bool,
                     check_choice, check_float, check_int, check_num_inference_steps, check_step_inputs,
                     checked_timesteps, karras_sigmas, sigma_to_t, train_sigmas)


@dataclasses.dataclass(frozen=True)
class DPMSolverConfig(BaseConfig):
    """diffusers ``DPMSolverMultistepScheduler`` fields we implement (defaults are diffusers')."""

    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf

    INERT: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "thresholding": (False,), "variance_type": (None,), "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,), "use_lu_lambdas": (False,), "use_flow_sigmas": (False,),
        "use_dynamic_shifting": (False,),
    }

    def __post_init__(self):
        super().__post_init__()
        check_int("solver_order", self.solver_order, 1)
        if self.solver_order > 2:
            raise SchedulerConfigError(f"scheduler config solver_order={self.solver_order!r}: expected 1 or 2 "
                                       "(third order is not implemented)")
        check_choice("algorithm_type", self.algorithm_type, ("dpmsolver++",))
        check_choice("solver_type", self.solver_type, ("midpoint", "heun"))
        check_bool("lower_order_final", self.lower_order_final)
        check_bool("euler_at_final", self.euler_at_final)
        if self.use_karras_sigmas is None:
            object.__setattr__(self, "use_karras_sigmas", False)
        check_bool("use_karras_sigmas", self.use_karras_sigmas)
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        check_float("lambda_min_clipped", self.lambda_min_clipped)


@struct.dataclass
class DPMSolverState:
    """Per-run arrays; index i is inference step i (diffusers order, noisiest first)."""

    timesteps: jnp.ndarray         # int32 [n] the model's t
    init_noise_sigma: jnp.ndarray  # float32 scalar (1)
    sigmas: jnp.ndarray            # float32 [n + 1] sqrt((1 - alpha_bar) / alpha_bar), the last one final
    x0_from_sample: jnp.ndarray    # float32 [n] data prediction D0 = a·sample + b·model_output …
    x0_from_output: jnp.ndarray    # float32 [n] … these are a and b
    c_sample: jnp.ndarray          # float32 [n]
    c_x0: jnp.ndarray              # float32 [n]
    c_diff: jnp.ndarray            # float32 [n] 0 on first-order steps
    prev_x0: jnp.ndarray           # float32 [*sample_shape] D0 of the previous step (zeros before the first)

    @property
    def num_inference_steps(self) -> int:
        return self.timesteps.shape[0]


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler(DDPMForwardProcess):
    config: DPMSolverConfig = DPMSolverConfig()

    CONFIG: ClassVar[type] = DPMSolverConfig
    DIFFUSERS_CLASS: ClassVar[str] = "DPMSolverMultistepScheduler"
    KIND: ClassVar[str] = "dpm++2m"
    ZERO_SNR_FLOOR: ClassVar[bool] = True

    def sigmas_and_timesteps(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(float32 sigmas [n + 1], int64 timesteps [n]) as diffusers' ``set_timesteps`` makes them."""
        c = self.config
        n = check_num_inference_steps(num_inference_steps, c.num_train_timesteps, self.sigmas_and_timesteps)
        big_t = c.num_train_timesteps
        ac = alphas_cumprod(c, self.ZERO_SNR_FLOOR)
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))  # float32, decreasing in t
        last = big_t - int(np.searchsorted(lambdas[::-1], c.lambda_min_clipped))
        if c.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif c.timestep_spacing == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + c.steps_offset
        else:  # trailing
            ts = np.arange(last, 0, -big_t / n).round().astype(np.int64) - 1
        sig = train_sigmas(c, self.ZERO_SNR_FLOOR)
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(float(sig[0]), float(sig[-1]), n)
            ts = sigma_to_t(sigmas, np.log(sig))
            if c.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
            ts = ts.astype(np.int64)
        else:
            sigmas = np.interp(ts, np.arange(len(sig)), sig)
        final = float(sig[0]) if c.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [final]]).astype(np.float32)
        return sigmas, checked_timesteps(ts, n, big_t, "DPMSolverMultistepScheduler.set_timesteps",
                                         self.sigmas_and_timesteps)

    def step_orders(self, num_inference_steps: int) -> np.ndarray:
        """The solver order diffusers uses at each step of a run (1 or 2)."""
        c, n = self.config, num_inference_steps
        orders = np.full(n, c.solver_order)
        orders[0] = 1
        final_first_order = c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero"
        if final_first_order:
            orders[-1] = 1
        return orders

    def set_timesteps(self, num_inference_steps: int,
                      sample_shape: tuple[int, ...] | None = None) -> DPMSolverState:
        """The state for a run. ``sample_shape`` (the latents' shape) is needed to :meth:`step`: the
        multistep history lives in the state, and a ``lax.fori_loop`` carry cannot change shape."""
        c = self.config
        sigmas, ts = self.sigmas_and_timesteps(num_inference_steps)
        n = len(ts)
        s = sigmas.astype(np.float64)
        alpha = 1.0 / np.sqrt(s ** 2 + 1)
        sigma = s * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf at a zero final sigma
        orders = self.step_orders(n)
        c_sample, c_x0, c_diff = np.zeros(n), np.zeros(n), np.zeros(n)
        with np.errstate(divide="ignore", invalid="ignore"):
            for i in range(n):
                h = lam[i + 1] - lam[i]
                em1 = np.expm1(-h)  # exp(-h) - 1, = -1 at a zero final sigma
                c_sample[i] = sigma[i + 1] / sigma[i]
                c_x0[i] = -alpha[i + 1] * em1
                if orders[i] == 2:
                    r0 = (lam[i] - lam[i - 1]) / h
                    if c.solver_type == "midpoint":
                        c_diff[i] = -0.5 * alpha[i + 1] * em1 / r0
                    else:  # heun
                        c_diff[i] = alpha[i + 1] * (em1 / h + 1.0) / r0
        sig_s = sigma[:n]
        alpha_s = alpha[:n]
        if c.prediction_type == "epsilon":  # D0 = (x - sigma_s eps) / alpha_s
            a, b = 1.0 / alpha_s, -sig_s / alpha_s
        elif c.prediction_type == "v_prediction":  # D0 = alpha_s x - sigma_s v
            a, b = alpha_s, -sig_s
        else:  # sample
            a, b = np.zeros(n), np.ones(n)
        prev_x0 = jnp.zeros(() if sample_shape is None else tuple(sample_shape), jnp.float32)
        f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        return DPMSolverState(timesteps=jnp.asarray(ts, jnp.int32), init_noise_sigma=f32(1.0), sigmas=f32(sigmas),
                              x0_from_sample=f32(a), x0_from_output=f32(b), c_sample=f32(c_sample),
                              c_x0=f32(c_x0), c_diff=f32(c_diff), prev_x0=prev_x0)

    def scale_model_input(self, state: DPMSolverState, sample: jnp.ndarray, step_index) -> jnp.ndarray:
        """DPM-Solver feeds the sample to the model unscaled."""
        del state, step_index
        return sample

    def step(self, state: DPMSolverState, model_output: jnp.ndarray, step_index,
             sample: jnp.ndarray) -> tuple[jnp.ndarray, DPMSolverState]:
        """One multistep update; must be called for step_index 0, 1, … in order (the history is in state)."""
        model_output, sample = check_step_inputs(model_output, sample)
        if state.prev_x0.shape != sample.shape:
            raise ValueError(
                f"DPMSolverMultistepScheduler.step: the state was made for sample shape {state.prev_x0.shape}, "
                f"got {sample.shape}; call set_timesteps(num_inference_steps, sample_shape=latents.shape)")
        i = step_index
        x0 = state.x0_from_sample[i] * sample + state.x0_from_output[i] * model_output
        prev = state.c_sample[i] * sample + state.c_x0[i] * x0 + state.c_diff[i] * (x0 - state.prev_x0)
        return prev, state.replace(prev_x0=x0)
