"""The pure training step every stage shares: :class:`TrainState`, the optimizer (AdamW after a global-norm clip,
constant or warm-up + cosine learning rate) and :func:`make_train_step` (micro-batches over ``lax.scan`` with fp32
gradient sums; per-step randomness ``fold_in(rng, step)``, so a resumed run draws what an uninterrupted one would).

:mod:`train.loop` wraps it with shardings, checkpoints and logging (and re-exports these names).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import struct

__all__ = ["PyTree", "LossFn", "TrainState", "learning_rate_schedule", "make_optimizer", "split_microbatches",
           "make_train_step"]

PyTree = Any
LossFn = Callable[[PyTree, PyTree, PyTree, PyTree, jax.Array], tuple[jax.Array, tuple[dict, PyTree]]]


# =========================================================================================================
@struct.dataclass
class TrainState:
    """Everything a step changes. ``rng`` is raw ``uint32`` key data (a plain array for checkpoints)."""

    step: jax.Array  # int32 scalar: optimizer updates done so far
    trainable: PyTree
    opt_state: PyTree
    mutable: PyTree  # e.g. {"batch_stats": ...}; {} when the task has none
    ema: PyTree  # EMA of ``trainable`` or None
    rng: jax.Array

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def learning_rate_schedule(opt: Mapping) -> optax.Schedule:
    """``lr`` with linear warm-up over ``warmup_steps``, then ``"constant"`` or ``"cosine"`` decay to
    ``lr · final_lr_fraction`` at ``decay_steps``."""
    lr, warmup = float(opt["lr"]), int(opt.get("warmup_steps", 0))
    kind = opt.get("schedule", "constant")
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        decay = int(opt.get("decay_steps", 0))
        if decay <= warmup:
            raise ValueError(f"optimizer.decay_steps ({decay}) must exceed warmup_steps ({warmup}) for 'cosine'")
        after = optax.cosine_decay_schedule(lr, decay - warmup, alpha=float(opt.get("final_lr_fraction", 0.0)))
    else:
        raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {kind!r}")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(opt: Mapping) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (``lr, b1, b2, eps, weight_decay``) after a global-norm clip (``clip_grad_norm``; ≤ 0 = off)."""
    schedule = learning_rate_schedule(opt)
    parts = []
    clip = float(opt.get("clip_grad_norm", 0.0) or 0.0)
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.adamw(schedule, b1=float(opt.get("b1", 0.9)), b2=float(opt.get("b2", 0.999)),
                             eps=float(opt.get("eps", 1e-8)), weight_decay=float(opt.get("weight_decay", 1e-2))))
    return optax.chain(*parts), schedule


def split_microbatches(batch: PyTree, accum_steps: int) -> PyTree:
    """``[B, ...]`` leaves → ``[accum_steps, B / accum_steps, ...]``; micro-batch ``i`` holds rows ``i, i+a, …``
    so that each device's contiguous shard of the batch splits locally (no data movement)."""
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch leading dim {x.shape[0]} is not divisible by accum_steps={accum_steps}")
        return jnp.swapaxes(x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]), 0, 1)

    return jax.tree_util.tree_map(split, batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, accum_steps: int = 1,
                    ema_decay: float | None = None, lr_schedule: optax.Schedule | None = None):
    """``step(state, frozen, batch) -> (state, metrics)``: pure, to be jitted (see :meth:`Trainer.compile`).

    ``metrics`` holds ``loss``, ``grad_norm`` (before clipping), ``lr`` and the task's own metrics, averaged over
    the micro-batches. With ``accum_steps > 1`` the mutable state (BatchNorm statistics) is threaded through the
    micro-batches in order."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen: PyTree, batch: PyTree) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.key, state.step)
        if accum_steps == 1:
            (loss, (metrics, mutable)), grads = grad_fn(state.trainable, frozen, state.mutable, batch, rng)
        else:
            micro = split_microbatches(batch, accum_steps)

            def body(carry, xs):
                grads_acc, mutable = carry
                i, mb = xs
                (loss_i, (m, mutable)), g = grad_fn(state.trainable, frozen, mutable, mb, jax.random.fold_in(rng, i))
                grads_acc = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), grads_acc, g)
                return (grads_acc, mutable), (loss_i, m)

            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable)
            (grads, mutable), (losses, ms) = jax.lax.scan(body, (zeros, state.mutable),
                                                          (jnp.arange(accum_steps), micro))
            grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grads)
            loss = jnp.mean(losses)
            metrics = jax.tree_util.tree_map(lambda v: jnp.mean(v, axis=0), ms)
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.trainable)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ema = state.ema
        if ema_decay is not None and ema is not None:
            ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, trainable)
        out = {"loss": loss, "grad_norm": grad_norm, **metrics}
        if lr_schedule is not None:
            out["lr"] = lr_schedule(state.step)
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, mutable=mutable,
                                  ema=ema)
        return new_state, jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), out)

    return step
