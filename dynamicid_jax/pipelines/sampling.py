"""The denoising loop shared by every pipeline: one ``lax.fori_loop`` inside one ``jax.jit``.

``denoise`` is written for tracing: the UNet call, classifier-free guidance and the scheduler step all stay on
device; scheduler math is fp32 whatever the UNet's compute dtype. Per-step method inputs (DynamicID's boost is a
function of the step index) are built by ``attention_inputs(step)`` so nothing depends on hidden counters.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

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
    if added_cond is not None and cfg:
        if uncond_added_cond is None:
            raise ValueError("guided sampling with added_cond needs uncond_added_cond too")
        added_cond = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond_added_cond,
                                            added_cond)
    extra = () if added_cond is None else (added_cond,)

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


def to_uint8(images: jax.Array) -> jax.Array:
    """``[-1, 1]`` float images → ``uint8`` (rounded, clipped)."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
