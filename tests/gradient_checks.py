"""Checks that a training step's gradients reach exactly its trainable parameters, and that it leaves frozen
parameters bitwise alone (shared by the stage tests)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def _flat(tree) -> dict[tuple, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(jax.device_get(tree))).items()}


def trainable_gradients(loss_fn, trainable, frozen, mutable, batch, rng):
    """``loss_fn(trainable, frozen, mutable, batch, rng) -> (loss, (metrics, new_mutable))`` (the loop's task
    contract) differentiated w.r.t. ``trainable`` only, jitted: ``(loss, (metrics, new_mutable), grads)``."""
    def run(params, frozen_, mutable_, batch_, rng_):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen_, mutable_, batch_, rng_)
        return loss, aux, grads

    return jax.jit(run)(trainable, frozen, mutable, jax.tree_util.tree_map(jnp.asarray, batch), rng)


def assert_gradients_on_every_leaf(grads, trainable) -> None:
    """Every trainable leaf has a finite gradient of its own shape that is not all zero (a leaf cut off from the
    loss would get exactly zero), and the gradient tree has no leaf that is not trainable."""
    g, p = _flat(grads), _flat(trainable)
    assert set(g) == set(p), f"gradient tree ≠ trainable tree: {sorted(set(g) ^ set(p))[:5]}"
    bad = ["/".join(k) for k in p if g[k].shape != p[k].shape or not np.all(np.isfinite(g[k]))]
    zero = ["/".join(k) for k in p if not np.any(g[k])]
    assert not bad, f"non-finite or misshapen gradients: {bad[:5]}"
    assert not zero, f"{len(zero)} of {len(p)} trainable leaves get no gradient, e.g. {zero[:5]}"


def snapshot(tree) -> dict[tuple, np.ndarray]:
    """A host copy of ``tree``'s leaves (for :func:`assert_bitwise_unchanged`)."""
    return {k: v.copy() for k, v in _flat(tree).items()}


def assert_bitwise_unchanged(before: dict[tuple, np.ndarray], tree, what: str) -> None:
    after = _flat(tree)
    assert set(after) == set(before), f"{what}: the tree changed its leaves"
    moved = ["/".join(k) for k in before if not np.array_equal(before[k], after[k])]
    assert not moved, f"{what}: {len(moved)} leaves changed, e.g. {moved[:5]}"
