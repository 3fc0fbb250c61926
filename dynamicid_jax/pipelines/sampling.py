"""The sampling core every pipeline shares: request checks, the denoising loop, the compiled-program cache.

**Request checks** (before anything is compiled or detected): :func:`check_number` — a float parameter
(guidance, id scale, boost, mix, eta, strengths) must be a finite number inside its range (``nan`` would run as
if guidance were off, ``inf`` would give a black image); :func:`check_prompts`; :func:`check_request_size` — at most
:data:`MAX_PROMPTS` prompts per call, and the estimated peak memory of the sampler (dominated by the attention
scores of the finest attention grid, which XLA materialises) must fit the device; the refusal names the estimate
and the limit. The limits and their reasons are listed in ``docs/errors_and_limits.md``.

**The denoising loop**: one ``lax.fori_loop`` inside one ``jax.jit``.

``denoise`` is written for tracing: the UNet call, classifier-free guidance and the scheduler step all stay on
device; scheduler math is fp32 whatever the UNet's compute dtype. Per-step method inputs (DynamicID's boost is a
function of the step index) are built by ``attention_inputs(step)`` so nothing depends on hidden counters.
"""
from __future__ import annotations

import collections
import math
import os
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp

from dynamicid_jax.errors import InputError, ResourceLimitError

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


AttentionInputs = Callable[[jax.Array], Any] | Any


def denoise(unet, unet_params, scheduler, num_steps: int, latents: jax.Array, context: jax.Array,
            guidance_scale: jax.Array | float, *, attention_inputs: AttentionInputs = None,
            uncond_context: jax.Array | None = None, added_cond: Any = None,
            uncond_added_cond: Any = None) -> jax.Array:
    """Run ``num_steps`` scheduler steps from ``latents`` (pure noise, unscaled) and return the final latents.

    With ``uncond_context`` the UNet runs once per step on the batch ``[uncond; cond]`` (``2B`` rows) and the
    guided prediction is ``ε_u + g (ε_c − ε_u)``; without it, plain conditional sampling.
    ``attention_inputs`` is a pytree, or a function of the traced step index returning one; it reaches every
    attention strategy of ``unet``. ``added_cond`` / ``uncond_added_cond`` (SDXL UNets only): the
    ``{"text_embeds", "time_ids"}`` of the conditional / unconditional rows, batched like the contexts.
    """
    state = scheduler.set_timesteps(num_steps, sample_shape=latents.shape)
    latents = latents.astype(jnp.float32) * state.init_noise_sigma
    cfg = uncond_context is not None
    ctx = jnp.concatenate([uncond_context, context], axis=0) if cfg else context
    extra = _added_cond_arg(added_cond, uncond_added_cond, cfg)

    def body(i, carry):
        x, sched_state = carry
        model_in = scheduler.scale_model_input(sched_state, x, i)
        if cfg:
            model_in = jnp.concatenate([model_in, model_in], axis=0)
        inputs = attention_inputs(i) if callable(attention_inputs) else attention_inputs
        t = sched_state.timesteps[i]
        out = unet.apply({"params": unet_params}, model_in.astype(unet.dtype), t, ctx, inputs, *extra)
        out = out.astype(jnp.float32)
        if cfg:
            out_u, out_c = jnp.split(out, 2, axis=0)
            out = out_u + guidance_scale * (out_c - out_u)
        return scheduler.step(sched_state, out, i, x)

    latents, _ = jax.lax.fori_loop(0, num_steps, body, (latents, state))
    return latents


def _added_cond_arg(added_cond: Any, uncond_added_cond: Any, guided: bool) -> tuple:
    """The UNet's extra positional argument: ``()`` without added conditioning (SD1.x), else ``(added_cond,)`` with
    the rows ``[uncond; cond]`` under guidance, batched like the contexts."""
    if added_cond is None:
        return ()
    if guided:
        if uncond_added_cond is None:
            raise ValueError("guided sampling with added_cond needs uncond_added_cond too")
        added_cond = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond_added_cond,
                                            added_cond)
    return (added_cond,)


def to_uint8(images: jax.Array) -> jax.Array:
    """``[-1, 1]`` float images → ``uint8`` (rounded, clipped)."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


# ------------------------------------------------------------------------------------------------ in chunks
# A long generation runs as several calls of one compiled program, each doing the steps ``start ≤ i < stop`` of
# the same loop (the bounds are traced values, so every chunk reuses the program). Between chunks Python gets
# control back, so Ctrl-C stops a generation within about one chunk (~1 s) instead of after the whole loop, and
# nothing is decoded or written. Each step runs the same kernels on the same values as in a single loop.

#: seconds one chunk aims for: the interrupt latency, and how much dispatch overhead the chunks add (a few ms each)
CHUNK_SECONDS = 1.0


def initial_carry(scheduler, num_steps: int, noise: jax.Array) -> tuple[jax.Array, Any]:
    """``(latents, scheduler state)`` before the first step: the noise scaled by the scheduler's initial sigma."""
    state = scheduler.set_timesteps(num_steps, sample_shape=noise.shape)
    return noise.astype(jnp.float32) * state.init_noise_sigma, state


def denoise_steps(unet, unet_params, carry: tuple[jax.Array, Any], start: jax.Array, stop: jax.Array,
                  context: jax.Array, guidance_scale: jax.Array | float, scheduler, *,
                  attention_inputs: AttentionInputs = None, uncond_context: jax.Array | None = None,
                  collect_gates: bool = False, added_cond: Any = None, uncond_added_cond: Any = None):
    """Steps ``start ≤ i < stop`` of :func:`denoise` from ``carry = (latents, scheduler state)`` (traced bounds).
    ``added_cond`` / ``uncond_added_cond``: as in :func:`denoise` (SDXL UNets only; ``None`` adds nothing to the
    program).

    Returns the new carry; with ``collect_gates`` also the sum over these steps of every sown ``gate`` of the
    conditional rows (``{layer path: [B, Lq]}``, DynamicID's gate maps)."""
    from flax import traverse_util

    cfg = uncond_context is not None
    ctx = jnp.concatenate([uncond_context, context], axis=0) if cfg else context
    extra = _added_cond_arg(added_cond, uncond_added_cond, cfg)
    rows = carry[0].shape[0]

    def run_unet(model_in, t, inputs):
        if not collect_gates:
            return unet.apply({"params": unet_params}, model_in.astype(unet.dtype), t, ctx, inputs, *extra), {}
        out, variables = unet.apply({"params": unet_params}, model_in.astype(unet.dtype), t, ctx, inputs, *extra,
                                    mutable=["intermediates"])
        gates = {"/".join(p[:-1]): v[0][-rows:].astype(jnp.float32)
                 for p, v in traverse_util.flatten_dict(variables.get("intermediates", {})).items()
                 if p[-1] == "gate"}
        return out, gates

    def inputs_at(i):
        return attention_inputs(i) if callable(attention_inputs) else attention_inputs

    x0, state0 = carry
    probe = jnp.concatenate([x0, x0], axis=0) if cfg else x0
    gate_shapes = jax.eval_shape(run_unet, probe, state0.timesteps[0], inputs_at(0))[1]
    sums = {k: jnp.zeros(v.shape, jnp.float32) for k, v in gate_shapes.items()}

    def body(i, loop_carry):
        x, sched_state, acc = loop_carry
        model_in = scheduler.scale_model_input(sched_state, x, i)
        if cfg:
            model_in = jnp.concatenate([model_in, model_in], axis=0)
        out, gates = run_unet(model_in, sched_state.timesteps[i], inputs_at(i))
        out = out.astype(jnp.float32)
        if cfg:
            out_u, out_c = jnp.split(out, 2, axis=0)
            out = out_u + guidance_scale * (out_c - out_u)
        x, sched_state = scheduler.step(sched_state, out, i, x)
        return x, sched_state, {k: acc[k] + gates[k] for k in acc}

    x, state, sums = jax.lax.fori_loop(start, stop, body, (x0, state0, sums))
    return ((x, state), sums) if collect_gates else (x, state)


def run_in_chunks(step: Callable[[Any, jax.Array, jax.Array], Any], carry: Any, num_steps: int, *,
                  chunk_seconds: float = CHUNK_SECONDS, on_chunk: Callable[[Any], None] | None = None) -> Any:
    """Call ``step(carry, start, stop) -> carry`` over ``0 … num_steps`` in chunks sized from the measured time per
    step (first chunk: one step), waiting for each; ``on_chunk`` sees every result (e.g. to add up gate sums).
    Ctrl-C between chunks raises ``KeyboardInterrupt`` at once."""
    import time

    start, size = 0, 1
    while start < num_steps:
        stop = min(num_steps, start + size)
        t0 = time.perf_counter()
        out = jax.block_until_ready(step(carry, jnp.int32(start), jnp.int32(stop)))
        per_step = (time.perf_counter() - t0) / (stop - start)
        if on_chunk is not None:
            out = on_chunk(out)
        carry, start = out, stop
        size = max(1, min(num_steps - start, int(chunk_seconds / max(per_step, 1e-6))))
    return carry


# ------------------------------------------------------------------------------------------------ shared programs
# Compiled samplers shared by every pipeline built from the same modules: a program depends on the modules, the
# scheduler and the shapes only (params are arguments), so a second pipeline of the same architecture — the CLI's,
# the web app's, a test's — reuses it instead of compiling again. Most recently used last.
_PROGRAMS: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()
MAX_SHARED_PROGRAMS = 8


def shared_program(key: Hashable, build: Callable[[], Any]) -> tuple[Any, bool]:
    """``(program, built)``: the program compiled for ``key`` (the modules, scheduler and sampler key it was built
    from), compiled by ``build()`` when no pipeline has one yet (``built`` tells which)."""
    built = key not in _PROGRAMS
    if built:
        _PROGRAMS[key] = build()
        while len(_PROGRAMS) > MAX_SHARED_PROGRAMS:
            _PROGRAMS.popitem(last=False)
    _PROGRAMS.move_to_end(key)
    return _PROGRAMS[key], built
