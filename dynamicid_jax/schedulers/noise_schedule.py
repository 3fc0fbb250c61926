"""The noise schedule every sampler extends: config parsing, the betas / alphas, the forward (training) process, and
:func:`load_scheduler`, which turns a diffusers ``scheduler/`` folder or config dict into one of ours.

The schedulers are frozen, hashable dataclasses holding only their config, so they can be static under
``jax.jit``. Everything that depends on the number of inference steps is computed once, on the host in
NumPy (float64 where we are free to, float32 where diffusers rounds to float32 and the rounding decides a
timestep), and handed to the device as a small pytree state. The per-step math then runs in float32.

Config dicts use diffusers' ``scheduler_config.json`` vocabulary. Keys we implement become dataclass fields;
keys of the mirrored diffusers class that we do not implement are accepted only at their inert values
(``thresholding=False`` …); keys of other diffusers schedulers are ignored; anything else is an error.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import threading
import types
from typing import Any, Callable, ClassVar, Mapping

import jax.numpy as jnp
import numpy as np


class SchedulerConfigError(ValueError):
    """A scheduler config that we cannot honour (unknown key, unsupported value, wrong type)."""


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Fields carried across when a config written for another scheduler class is loaded into one of ours
# (the beta schedule, the timestep grid, what the model predicts, and DDIM's two final-step fields, which
# diffusers' own ``from_config`` also carries across, e.g. SD1.5's PNDM config → DDIM).
SHARED_FIELDS = frozenset({
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
    "timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "set_alpha_to_one", "clip_sample",
    "clip_sample_range",
})

# Keys of diffusers schedulers (DDPM, DDIM, PNDM, LMS, Euler, Euler ancestral, Heun, DPM-Solver, UniPC, DEIS)
# that may appear in a ``scheduler_config.json`` and that a class which does not use them ignores.
KNOWN_DIFFUSERS_KEYS = SHARED_FIELDS | frozenset({
    "skip_prk_steps", "variance_type", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
    "solver_order", "solver_type", "algorithm_type", "lower_order_final", "euler_at_final", "final_sigmas_type",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
    "flow_shift", "lambda_min_clipped", "use_dynamic_shifting", "time_shift_type", "interpolation_type",
    "timestep_type", "sigma_min", "sigma_max", "predict_x0", "solver_p", "disable_corrector", "deis_order",
})


def _fail(what: str, value: Any, expected: str) -> SchedulerConfigError:
    return SchedulerConfigError(f"scheduler config {what}={value!r}: expected {expected}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise _fail(name, value, f"an int >= {minimum}")


def check_float(name: str, value: Any, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise _fail(name, value, "a number")
    if positive and not value > 0:
        raise _fail(name, value, "a number > 0")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise _fail(name, value, "true or false")


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Fields every scheduler shares (diffusers names and meanings). Subclasses set their own defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    # Keys of the mirrored diffusers class that we do not implement → the values at which they do nothing.
    INERT: ClassVar[Mapping[str, tuple[Any, ...]]] = {}

    def __post_init__(self):
        check_int("num_train_timesteps", self.num_train_timesteps, 2)
        check_float("beta_start", self.beta_start, positive=True)
        check_float("beta_end", self.beta_end, positive=True)
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        check_int("steps_offset", self.steps_offset, 0)
        check_bool("rescale_betas_zero_snr", self.rescale_betas_zero_snr)
        if self.trained_betas is not None:
            betas = tuple(float(b) for b in self.trained_betas)
            if len(betas) != self.num_train_timesteps or not all(0.0 < b < 1.0 for b in betas):
                raise _fail("trained_betas", f"<{len(betas)} values>",
                            f"{self.num_train_timesteps} values (num_train_timesteps), each in (0, 1)")
            object.__setattr__(self, "trained_betas", betas)
        for f in dataclasses.fields(self):  # normalise numpy scalars so equal configs hash equally
            v = getattr(self, f.name)
            if isinstance(v, np.generic):
                object.__setattr__(self, f.name, v.item())

    def to_dict(self) -> dict[str, Any]:
        """The config as a diffusers-style dict (``trained_betas`` as a list)."""
        out = dataclasses.asdict(self)
        if out["trained_betas"] is not None:
            out["trained_betas"] = list(out["trained_betas"])
        return out


def config_from_mapping(config_cls: type[BaseConfig], cfg: Mapping[str, Any], class_name: str) -> BaseConfig:
    """Builds ``config_cls`` from a diffusers scheduler config dict.

    When ``cfg["_class_name"]`` is absent or is ``class_name`` (or its ``Flax`` twin), every key must be one we
    implement, an inert key at its inert value, or a key of another diffusers scheduler (ignored). When it
    names another class, only :data:`SHARED_FIELDS` are taken and the rest must be known diffusers keys.
    """
    if not isinstance(cfg, Mapping):
        raise SchedulerConfigError(f"scheduler config: expected a dict, got {type(cfg).__name__}")
    source = cfg.get("_class_name")
    if isinstance(source, str) and source.startswith("Flax"):
        source = source[len("Flax"):]
    same_class = source is None or source == class_name
    fields = {f.name for f in dataclasses.fields(config_cls)}
    kwargs: dict[str, Any] = {}
    unknown, unsupported = [], []
    for key, value in cfg.items():
        if not isinstance(key, str):
            unknown.append(repr(key))
            continue
        if key.startswith("_"):  # _class_name, _diffusers_version, _use_default_values, _name_or_path
            continue
        if key in fields:  # the target supports it: honour it, whatever class the config names (as diffusers)
            kwargs[key] = value
        elif key in config_cls.INERT:
            if not any(value is v or (type(value) is type(v) and value == v) for v in config_cls.INERT[key]):
                allowed = " or ".join(repr(v) for v in config_cls.INERT[key])
                unsupported.append(f"{key}={value!r} (only {allowed} is supported)")
        elif not same_class and key in SAMPLING_KEYS and not _is_neutral(key, value):
            unsupported.append(f"{key}={value!r} (changes the noise levels, and {class_name} has no such option; "
                               f"pick a scheduler that has it, or remove the key)")
        elif key in KNOWN_DIFFUSERS_KEYS or any(key in c.INERT for c in _all_config_classes()):
            continue
        else:
            unknown.append(key)
    if unknown or unsupported:
        parts = []
        if unsupported:
            parts.append("unsupported values: " + "; ".join(unsupported))
        if unknown:
            parts.append("unknown keys: " + ", ".join(sorted(unknown)) +
                         f" (known: {', '.join(sorted(fields | set(config_cls.INERT)))})")
        raise SchedulerConfigError(f"{class_name} config: " + " | ".join(parts))
    if kwargs.get("trained_betas") is not None:
        kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
    return config_cls(**kwargs)


#: keys of other schedulers that change which noise levels are visited: taken over when the target scheduler has
#: them, refused by name when it does not (unless at their neutral value); other foreign keys (PNDM's
#: ``skip_prk_steps``, a DPM-Solver's ``solver_order`` read by DDIM) do not apply to the target and are ignored.
SAMPLING_KEYS: Mapping[str, tuple[Any, ...]] = {
    "use_karras_sigmas": (False, None), "use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None),
    "use_lu_lambdas": (False, None), "use_flow_sigmas": (False, None), "thresholding": (False, None),
    "final_sigmas_type": ("zero", None), "sigma_min": (None,), "sigma_max": (None,),
    "use_dynamic_shifting": (False, None),
}


def _is_neutral(key: str, value: Any) -> bool:
    return any(value is v or (type(value) is type(v) and value == v) for v in SAMPLING_KEYS[key])


def _all_config_classes() -> list[type[BaseConfig]]:
    out, todo = [], [BaseConfig]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out


# ---------------------------------------------------------------------------------------------- noise schedule

def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The squaredcos_cap_v2 (improved-DDPM cosine) betas."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    t = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), max_beta) for i in range(t)], np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alpha_bar) so the last timestep has zero SNR (Lin et al. 2023, Alg. 1)."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))  # float64 here; diffusers: float32
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab ** 2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def _linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """float32 linspace rounded as torch's does it (so betas, hence Karras timesteps, match diffusers bit for
    bit): a float32 step; the first half as start + i·step, the second as end − (num−1−i)·step, each
    rounded once (the product of two float32 values is exact in float64)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(num - 1)))
    i = np.arange(num, dtype=np.float64)
    values = np.where(i < num // 2, np.float64(start32) + i * step, np.float64(end32) - (num - 1 - i) * step)
    return values.astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """Cumulative product accumulated in float64, stored in float32 (what torch.cumprod gives on CPU)."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


@functools.lru_cache(maxsize=64)
def alphas_cumprod(config: BaseConfig, zero_snr_floor: bool) -> np.ndarray:
    """float32 ``alpha_bar[t]`` for t in [0, num_train_timesteps), as diffusers computes it (read-only).

    ``zero_snr_floor``: the sigma-based schedulers replace a zero last value by 2**-24 so sigma stays finite.
    """
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float32)
    elif config.beta_schedule == "linear":
        betas = _linspace_f32(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        betas = _linspace_f32(config.beta_start ** 0.5, config.beta_end ** 0.5, n) ** 2
    else:
        betas = _cosine_betas(n)
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    out = _cumprod_f32(1.0 - betas)
    if config.rescale_betas_zero_snr and zero_snr_floor:
        out[-1] = 2.0 ** -24
    out.setflags(write=False)
    return out


def train_sigmas(config: BaseConfig, zero_snr_floor: bool = True) -> np.ndarray:
    """float32 ``sqrt((1 - alpha_bar) / alpha_bar)`` for every training timestep (ascending in t)."""
    ac = alphas_cumprod(config, zero_snr_floor)
    return ((1 - ac) / ac) ** 0.5


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep whose sigma is ``sigma`` (linear interpolation in log-sigma)."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas), 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: n sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class StepRangeError(ValueError):
    """``num_inference_steps`` outside what this scheduler config can sample."""


_SCAN = threading.local()


def _steps_limit(timesteps_of: Callable[[int], Any] | None, num_train_timesteps: int) -> int:
    """The largest step count ``timesteps_of`` accepts (``steps_offset`` and the spacing can make it smaller
    than ``num_train_timesteps``), so that every refusal prints the same, true range."""
    if timesteps_of is None or getattr(_SCAN, "active", False):
        return num_train_timesteps
    _SCAN.active = True
    try:
        for n in range(num_train_timesteps, 0, -1):
            try:
                timesteps_of(n)
                return n
            except StepRangeError:
                continue
        return 0
    finally:
        _SCAN.active = False


def check_num_inference_steps(num_inference_steps: Any, num_train_timesteps: int,
                              timesteps_of: Callable[[int], Any] | None = None) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be a Python int (it fixes array shapes), "
                        f"got {type(num_inference_steps).__name__}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        limit = _steps_limit(timesteps_of, num_train_timesteps)
        raise StepRangeError(f"num_inference_steps={num_inference_steps}: expected 1..{limit} for this scheduler "
                             f"config")
    return int(num_inference_steps)


def checked_timesteps(timesteps: np.ndarray, num_inference_steps: int, num_train_timesteps: int,
                      what: str, timesteps_of: Callable[[int], Any] | None = None) -> np.ndarray:
    if len(timesteps) != num_inference_steps:
        raise StepRangeError(f"{what}: {num_inference_steps} steps give {len(timesteps)} timesteps; "
                             f"choose another num_inference_steps or timestep_spacing")
    if timesteps.min() < 0 or timesteps.max() > num_train_timesteps - 1:
        if timesteps_of is None or getattr(_SCAN, "active", False):
            raise StepRangeError(f"{what}: timesteps {timesteps.min()}..{timesteps.max()} leave [0, "
                                 f"{num_train_timesteps - 1}]; lower steps_offset or num_inference_steps")
        raise StepRangeError(f"num_inference_steps={num_inference_steps}: expected 1.."
                             f"{_steps_limit(timesteps_of, num_train_timesteps)} for this scheduler config "
                             f"(more steps would put timesteps outside [0, {num_train_timesteps - 1}]; a smaller "
                             f"steps_offset allows more)")
    return timesteps


def check_step_inputs(model_output: jnp.ndarray, sample: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    if model_output.shape != sample.shape:
        raise ValueError(f"step: model_output shape {model_output.shape} != sample shape {sample.shape}")
    return jnp.asarray(model_output, jnp.float32), jnp.asarray(sample, jnp.float32)


def x0_from_model_output(prediction_type: str, model_output: jnp.ndarray, sample: jnp.ndarray,
                         sqrt_alpha_bar, sqrt_one_minus_alpha_bar) -> jnp.ndarray:
    """The clean sample a model output implies for ``sample = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps``:
    ``(x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)`` for ε, ``sqrt(alpha_bar) x - sqrt(1 - alpha_bar) v`` for v,
    the output itself for ``"sample"`` (shared by the DDIM step and :meth:`DDPMForwardProcess.predicted_original`)."""
    if prediction_type == "epsilon":
        return (sample - sqrt_one_minus_alpha_bar * model_output) / sqrt_alpha_bar
    if prediction_type == "v_prediction":
        return sqrt_alpha_bar * sample - sqrt_one_minus_alpha_bar * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")


class DDPMForwardProcess:
    """``add_noise`` / ``get_velocity`` / ``predicted_original`` of the DDPM forward process at training timesteps
    (for the trainer and diagnostics).

    ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``; ``v = sqrt(alpha_bar_t) eps - sqrt(1 -
    alpha_bar_t) x_0``. ``timesteps`` are int training timesteps, shape [B] (or scalar), broadcast over the
    trailing axes of the sample (NHWC).
    """

    config: BaseConfig
    ZERO_SNR_FLOOR: ClassVar[bool] = True
    # Each scheduler names its config class, the diffusers class it mirrors and its load_scheduler(kind=...) name.
    CONFIG: ClassVar[type[BaseConfig]] = BaseConfig
    DIFFUSERS_CLASS: ClassVar[str] = ""
    KIND: ClassVar[str] = ""

    def __post_init__(self):
        want = self.CONFIG.__name__
        if not isinstance(self.config, self.CONFIG):
            raise TypeError(f"{type(self).__name__}: config must be {'an' if want[0] in 'AEIOU' else 'a'} {want}, "
                            f"got {type(self.config).__name__}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]):
        """From a diffusers ``scheduler_config.json`` dict (another class's config: shared fields only)."""
        return cls(config_from_mapping(cls.CONFIG, cfg, cls.DIFFUSERS_CLASS))

    def _forward_coefficients(self, timesteps, like: jnp.ndarray, name: str):
        timesteps = jnp.asarray(timesteps)
        if not jnp.issubdtype(timesteps.dtype, jnp.integer):
            raise TypeError(f"{name}: timesteps must be integer training timesteps, got dtype {timesteps.dtype}")
        if timesteps.ndim > 1 or (timesteps.ndim == 1 and like.ndim and timesteps.shape[0] != like.shape[0]):
            raise ValueError(f"{name}: timesteps shape {timesteps.shape}: expected () or [B] with "
                             f"B = {like.shape[0] if like.ndim else '?'}")
        ac = alphas_cumprod(self.config, self.ZERO_SNR_FLOOR).astype(np.float64)
        sqrt_ac = jnp.asarray(np.sqrt(ac), jnp.float32)[timesteps]
        sqrt_1m_ac = jnp.asarray(np.sqrt(1 - ac), jnp.float32)[timesteps]
        shape = timesteps.shape + (1,) * (like.ndim - timesteps.ndim)
        return sqrt_ac.reshape(shape), sqrt_1m_ac.reshape(shape)

    def add_noise(self, original: jnp.ndarray, noise: jnp.ndarray, timesteps) -> jnp.ndarray:
        """The noisy sample at training timesteps ``timesteps`` (int [B])."""
        if original.shape != noise.shape:
            raise ValueError(f"add_noise: original shape {original.shape} != noise shape {noise.shape}")
        a, s = self._forward_coefficients(timesteps, original, "add_noise")
        return a * original.astype(jnp.float32) + s * noise.astype(jnp.float32)

    def predicted_original(self, model_output: jnp.ndarray, sample: jnp.ndarray, timesteps) -> jnp.ndarray:
        """The clean sample ``x_0`` a model output implies for the noisy ``sample`` at training timesteps (int [B]):
        the inverse of :meth:`add_noise` given ε, of :meth:`get_velocity` given v, the output itself for
        ``"sample"`` prediction."""
        model_output, sample = check_step_inputs(model_output, sample)
        a, s = self._forward_coefficients(timesteps, sample, "predicted_original")
        return x0_from_model_output(self.config.prediction_type, model_output, sample, a, s)

    def get_velocity(self, sample: jnp.ndarray, noise: jnp.ndarray, timesteps) -> jnp.ndarray:
        """The v-prediction target for clean ``sample`` and ``noise`` at training timesteps (int [B])."""
        if sample.shape != noise.shape:
            raise ValueError(f"get_velocity: sample shape {sample.shape} != noise shape {noise.shape}")
        a, s = self._forward_coefficients(timesteps, sample, "get_velocity")
        return a * noise.astype(jnp.float32) - s * sample.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------- loading

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


def scheduler_kinds() -> dict[str, type[DDPMForwardProcess]]:
    """``{kind: scheduler class}`` of every scheduler we implement (each subclass of :class:`DDPMForwardProcess`
    names its ``KIND``), in definition order."""
    return {cls.KIND: cls for cls in DDPMForwardProcess.__subclasses__() if getattr(cls, "KIND", None)}


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


def load_scheduler(path_or_dict: str | os.PathLike | Mapping[str, Any], kind: str | None = None) -> DDPMForwardProcess:
    """Builds a scheduler from a diffusers config.

    Without ``kind`` the config's ``_class_name`` must be DDIMScheduler, DPMSolverMultistepScheduler or
    EulerDiscreteScheduler. With ``kind`` ("ddim", "dpm++2m", "euler") that scheduler is built; from a config of
    another class (e.g. SD1.5's own PNDMScheduler) only the shared beta/timestep fields are taken.
    """
    cfg = dict(path_or_dict) if isinstance(path_or_dict, Mapping) else read_scheduler_config(path_or_dict)
    kinds = scheduler_kinds()
    by_class_name = {cls.DIFFUSERS_CLASS: cls for cls in kinds.values()}
    class_name = cfg.get("_class_name")
    if isinstance(class_name, str) and class_name.startswith("Flax"):
        class_name = class_name[len("Flax"):]
    choices = ", ".join(repr(k) for k in kinds)
    if kind is None:
        if class_name not in by_class_name:
            raise SchedulerConfigError(
                f"scheduler config _class_name={class_name!r} is not one we implement "
                f"({', '.join(by_class_name)}); pass kind= one of {choices} to build that scheduler from the "
                f"shared beta/timestep fields of this config")
        return by_class_name[class_name].from_config(cfg)
    if kind not in kinds:
        raise ValueError(f"load_scheduler: kind={kind!r}: expected one of {choices}")
    return kinds[kind].from_config(cfg)
