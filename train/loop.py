"""One train loop for every stage: a pure, jitted step with explicit shardings, Orbax checkpoints, logging.

A stage describes itself as a :class:`Task`: how to build its trainable params (and optional mutable state such
as BatchNorm statistics) from a PRNG key and the frozen params, their *abstract* (boxed, logical-axis) trees,
and a loss ``loss_fn(trainable, frozen, mutable, batch, rng) -> (loss, (metrics, new_mutable))``. The loop
keeps the two param sets apart:

* ``frozen`` params (UNet base, VAE, text / image encoders, …) are a separate, non-donated argument of the step.
  They have no gradient, no optimizer state and are never checkpointed (the checkpoint records where they
  came from: ``Task.frozen_source``).
* :class:`TrainState` holds ``trainable`` (fp32), the optimizer state of exactly those params, ``mutable``, an
  optional EMA of ``trainable``, the step and the PRNG key data. The step donates it.

The step (:func:`make_train_step`) splits the batch into ``accum_steps`` micro-batches (``lax.scan``, gradients
summed in fp32), clips by global norm and applies AdamW (:func:`train.config.make_optimizer`, from the config's
``optimizer`` section); the per-step randomness is ``fold_in(rng, step)`` so that a resumed run draws exactly what
an uninterrupted one would. Compute dtype and rematerialisation belong to the models the task builds.

:class:`Trainer` places everything on the mesh (``dynamicid_jax.sharding``: params by their logical axes, the
batch split over ``("data", "fsdp")``), restores the latest checkpoint onto the *current* mesh, runs the loop,
logs (progress bar, TensorBoard scalars, sample grids — process 0 only) and saves Orbax checkpoints (async,
keep-N, atomic: a checkpoint directory appears only once complete) holding the train state, the Grain
iterator state of every process, the config and metadata.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding

from dynamicid_jax import sharding as sh
from dynamicid_jax.errors import DynamicIDError
from dynamicid_jax.sharding import barrier, host_value, replicated_to_host  # noqa: F401 (re-exported)
from train.config import learning_rate_schedule, make_optimizer, training_defaults  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


# =========================================================================================================
# The step
# =========================================================================================================
PyTree = Any
LossFn = Callable[[PyTree, PyTree, PyTree, PyTree, jax.Array], tuple[jax.Array, tuple[dict, PyTree]]]


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


# =========================================================================================================
# Task: what a stage provides
# =========================================================================================================
@dataclasses.dataclass
class Task:
    """A trainable stage.

    * ``init(rng, frozen) -> (trainable, mutable)``: fresh trainable params (may read the frozen ones, e.g. to
      copy ``to_k`` into ``to_k_ip``) and mutable collections (``{}`` if none); traced under ``jax.jit``.
      Or ``init=None`` and ``initial = (trainable, mutable)``: what ``init`` would return, already drawn (e.g.
      on the host, which spares compiling a model's ``init``).
    * ``abstract_trainable`` / ``abstract_mutable`` / ``abstract_frozen``: boxed abstract trees (from
      ``jax.eval_shape(module.init, …)``) whose logical axis names give the shardings; unboxed leaves are
      replicated.
    * ``frozen``: the frozen params (host or device arrays), placed on the mesh by the trainer.
    * ``loss_fn``: see :data:`LossFn`.
    * ``sample_fn(trainable, frozen, mutable) -> uint8 [N, H, W, 3]`` (optional): the sample grid, jitted by
      the trainer (every process runs it, process 0 writes it).
    * ``frozen_source``: JSON-able description of where the frozen weights came from (stored in checkpoints).
    """

    init: Callable[[jax.Array, PyTree], tuple[PyTree, PyTree]] | None
    abstract_trainable: PyTree
    abstract_frozen: PyTree
    frozen: PyTree
    loss_fn: LossFn
    abstract_mutable: PyTree = dataclasses.field(default_factory=dict)
    sample_fn: Callable[[PyTree, PyTree, PyTree], jax.Array] | None = None
    frozen_source: Mapping = dataclasses.field(default_factory=dict)
    batch_shardings: Callable[[Mesh, PyTree], PyTree] | None = None  # default: leading axis over data×fsdp
    initial: tuple[PyTree, PyTree] | None = None  # with init=None: fresh (trainable, mutable)

    def __post_init__(self):
        if (self.init is None) == (self.initial is None):
            raise ValueError("Task: give exactly one of init (a function) and initial ((trainable, mutable))")

    @classmethod
    def of(cls, stage: Any, **extra: Any) -> "Task":
        """The task of a stage object with ``init``, ``abstract_trainable()``, ``abstract_frozen()``, ``frozen``,
        ``loss_fn`` and ``frozen_source`` (stage 1, stage 2, Infinite-ID); ``extra``: the other fields."""
        return cls(init=stage.init, abstract_trainable=stage.abstract_trainable(),
                   abstract_frozen=stage.abstract_frozen(), frozen=stage.frozen, loss_fn=stage.loss_fn,
                   frozen_source=stage.frozen_source, **extra)


# the shared sections' defaults live in train/configs/defaults/training.yaml
_SHARED = training_defaults()
TRAIN_DEFAULTS: dict[str, Any] = _SHARED["train"]
CHECKPOINT_DEFAULTS: dict[str, Any] = _SHARED["checkpoint"]
OPTIMIZER_DEFAULTS: dict[str, Any] = _SHARED["optimizer"]
MESH_DEFAULTS: dict[str, Any] = _SHARED["mesh"]


# =========================================================================================================
# Shardings
# =========================================================================================================
def tree_shardings(abstract: PyTree, mesh: Mesh) -> PyTree:
    """``NamedSharding`` per leaf from logical axis boxes; dims that do not divide are replicated (logged)."""
    if not jax.tree_util.tree_leaves(abstract):
        return jax.tree_util.tree_map(lambda x: sh.replicated(mesh), abstract)
    return sh.logical_to_sharding(abstract, mesh, allow_replicate_uneven=True)


def _unboxed(tree: PyTree) -> PyTree:
    return sh._unbox(tree)  # noqa: SLF001 (the sharding module's own unboxing helper)


def state_shardings(task: Task, tx: optax.GradientTransformation, mesh: Mesh, use_ema: bool
                    ) -> tuple[TrainState, TrainState]:
    """``(abstract_state, shardings)``: the optimizer state's param-shaped leaves follow their params' shardings
    (``optax.tree_map_params``); counts and other scalars are replicated."""
    trainable_sh = tree_shardings(task.abstract_trainable, mesh)
    mutable_sh = tree_shardings(task.abstract_mutable, mesh)
    trainable_abs = _unboxed(task.abstract_trainable)
    opt_abs = jax.eval_shape(tx.init, trainable_abs)
    rep = sh.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abs, trainable_sh,
                                   transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    shardings = TrainState(step=rep, trainable=trainable_sh, opt_state=opt_sh, mutable=mutable_sh,
                           ema=trainable_sh if use_ema else None, rng=rep)
    mutable_abs = _unboxed(task.abstract_mutable)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable_abs, opt_state=opt_abs, mutable=mutable_abs,
        ema=trainable_abs if use_ema else None, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract, shardings)
    return abstract, shardings


def default_batch_shardings(mesh: Mesh, batch: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: sh.batch_sharding(mesh, np.ndim(x)), batch)


def put_batch(batch: PyTree, shardings: PyTree) -> PyTree:
    """Host batch → global arrays. One process: the batch is global. Several: each passes its own local rows
    (``jax.make_array_from_process_local_data``)."""
    multi = jax.process_count() > 1

    def put(x, s):
        x = np.asarray(x)
        if multi:
            return jax.make_array_from_process_local_data(s, x)
        return jax.device_put(x, s)

    return jax.tree_util.tree_map(put, batch, shardings)


def numeric_batch(batch: Mapping) -> dict:
    """Drop the non-array entries of a loader batch (strings such as ``identity``) before it goes on device."""
    out = {}
    for k, v in batch.items():
        a = np.asarray(v)
        if a.dtype.kind in "biuf":
            out[k] = a
    return out


# =========================================================================================================
# Checkpoints
# =========================================================================================================
def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def make_checkpoint_manager(directory: str, *, keep: int, use_async: bool, with_data: bool):
    ocp = _ocp()
    items = ["state", "config", "meta"] + (["data"] if with_data else [])
    handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    if with_data:
        import grain

        handlers["data"] = grain.checkpoint.CheckpointHandler()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async, create=True,
                                           cleanup_tmp_directories=True)
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=tuple(items), item_handlers=handlers,
                                    options=options)
    manager.dynamicid_items = tuple(items)  # the item names, for save / restore to consult
    return manager


def _is_grain_iterator(it: Any) -> bool:
    return hasattr(it, "get_state") and hasattr(it, "set_state")


# =========================================================================================================
# Trainer
# =========================================================================================================
class Trainer:
    """Runs a :class:`Task` on a mesh with checkpoints and logs under ``workdir``.

    ``cfg`` needs the sections ``train`` (:data:`TRAIN_DEFAULTS`), ``optimizer`` (:data:`OPTIMIZER_DEFAULTS`),
    ``checkpoint`` (:data:`CHECKPOINT_DEFAULTS`) and ``mesh`` (:data:`MESH_DEFAULTS`)."""

    def __init__(self, task: Task, cfg: Mapping, workdir: str, *, mesh: Mesh | None = None):
        self.task, self.cfg, self.workdir = task, cfg, workdir
        tcfg = {**TRAIN_DEFAULTS, **cfg.get("train", {})}
        self.tcfg = tcfg
        self.ckcfg = {**CHECKPOINT_DEFAULTS, **cfg.get("checkpoint", {})}
        self.mesh = mesh if mesh is not None else sh.make_mesh(sh.MeshConfig(**{**MESH_DEFAULTS,
                                                                                **cfg.get("mesh", {})}))
        self.tx, self.schedule = make_optimizer({**OPTIMIZER_DEFAULTS, **cfg.get("optimizer", {})})
        self.use_ema = tcfg.get("ema_decay") is not None
        self.abstract_state, self.state_sh = state_shardings(task, self.tx, self.mesh, self.use_ema)
        self.frozen_sh = tree_shardings(task.abstract_frozen, self.mesh)
        self.frozen = sh.shard_params(task.frozen, self.frozen_sh) if jax.tree_util.tree_leaves(task.frozen) else \
            task.frozen
        step = make_train_step(task.loss_fn, self.tx, accum_steps=int(tcfg["accum_steps"]),
                               ema_decay=tcfg.get("ema_decay"), lr_schedule=self.schedule)
        self._step_fn = step
        self._jitted: dict[Any, Callable] = {}
        self.is_primary = jax.process_index() == 0

    # ---- state ---------------------------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        """A fresh state, created directly in its shards."""
        seed = int(self.tcfg["seed"])

        key = jax.random.key(seed)

        def state(trainable, mutable):
            return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=self.tx.init(trainable),
                              mutable=mutable, ema=trainable if self.use_ema else None,
                              rng=jax.random.key_data(jax.random.fold_in(key, 2)))

        def init(frozen):
            trainable, mutable = self.task.init(jax.random.fold_in(key, 1), frozen)
            return state(_unboxed(trainable), _unboxed(mutable))

        with sh.use_mesh(self.mesh), sh.axis_rules():
            if self.task.init is None:
                return jax.jit(state, in_shardings=(self.state_sh.trainable, self.state_sh.mutable),
                               out_shardings=self.state_sh)(*self.task.initial)
            return jax.jit(init, in_shardings=(self.frozen_sh,), out_shardings=self.state_sh)(self.frozen)

    def step_fn(self, batch_shardings: PyTree) -> Callable:
        """The jitted step for batches with these shardings (state donated; metrics replicated)."""
        key = jax.tree_util.tree_structure(batch_shardings), tuple(
            (s.spec,) for s in jax.tree_util.tree_leaves(batch_shardings))
        if key not in self._jitted:
            self._jitted[key] = sh.sharded_jit(
                self._step_fn, in_shardings=(self.state_sh, self.frozen_sh, batch_shardings),
                out_shardings=(self.state_sh, sh.replicated(self.mesh)), donate_argnums=(0,), mesh=self.mesh)
        return self._jitted[key]

    def batch_shardings(self, batch: PyTree) -> PyTree:
        fn = self.task.batch_shardings or default_batch_shardings
        return fn(self.mesh, batch)

    def train_step(self, state: TrainState, host_batch: PyTree) -> tuple[TrainState, dict]:
        shardings = self.batch_shardings(host_batch)
        batch = put_batch(host_batch, shardings)
        key = ("compiled", jax.tree_util.tree_structure(batch),
               tuple((x.shape, x.dtype, s.spec) for x, s in zip(jax.tree_util.tree_leaves(batch),
                                                                  jax.tree_util.tree_leaves(shardings))))
        if key not in self._jitted:
            # Compile ahead of time, then wait for every process: CPU (gloo) collectives give up after 30 s
            # when one process is still compiling while another already runs the step.
            self._jitted[key] = self.step_fn(shardings).lower(state, self.frozen, batch).compile()
            barrier(f"train_step_compiled_{len(self._jitted)}")
        return self._jitted[key](state, self.frozen, batch)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_manager(self, with_data: bool):
        return make_checkpoint_manager(os.path.join(self.workdir, "checkpoints"), keep=int(self.ckcfg["keep"]),
                                       use_async=bool(self.ckcfg["async"]), with_data=with_data)

    def _meta(self, step: int) -> dict:
        return {"step": int(step), "frozen_source": dict(self.task.frozen_source),
                "mesh": {k: int(v) for k, v in self.mesh.shape.items()}, "process_count": jax.process_count(),
                "trainable_params": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(
                    self.abstract_state.trainable)))}

    def save(self, manager, state: TrainState, data_iter: Any = None, *, force: bool = False) -> bool:
        ocp = _ocp()
        step = int(host_value(state.step))
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(_jsonable(self.cfg)),
                "meta": ocp.args.JsonSave(self._meta(step))}
        if data_iter is not None and "data" in manager.dynamicid_items:
            import grain

            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, manager, data_iter: Any = None, step: int | None = None) -> TrainState | None:
        """The state of checkpoint ``step`` (default: the latest) on the current mesh, or ``None`` if there is
        none; ``data_iter`` (a Grain iterator) is set to where that run's iterator was."""
        ocp = _ocp()
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        args = {"state": ocp.args.StandardRestore(self.abstract_state)}
        if data_iter is not None and "data" in manager.dynamicid_items:
            import grain

            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    # ---- the loop ------------------------------------------------------------------------------------------
    def fit(self, data_iter: Iterator, *, steps: int | None = None,
            on_step: Callable[[int, TrainState, dict], None] | None = None) -> TrainState:
        """Train until ``steps`` (default ``train.steps``) optimizer updates, resuming from the latest
        checkpoint in ``workdir`` if there is one. ``data_iter`` yields host batches (this process's rows);
        a Grain ``DatasetIterator`` is checkpointed with the state."""
        total = int(self.tcfg["steps"] if steps is None else steps)
        grain_iter = data_iter if _is_grain_iterator(data_iter) else None
        manager = self.checkpoint_manager(with_data=grain_iter is not None)
        state = self.restore(manager, grain_iter)
        if state is None:
            state = self.init_state()
        start = int(host_value(state.step))
        if start:
            log.info("resumed from step %d", start)
        writer = None
        if self.is_primary:
            from train.tensorboard import EventWriter

            writer = EventWriter(os.path.join(self.workdir, "tb"))
        bar = None
        if self.is_primary and self.tcfg.get("progress_bar", True):
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        log_every, sample_every = int(self.tcfg["log_every"]), int(self.tcfg.get("sample_every") or 0)
        ck_every = int(self.ckcfg["every"])
        last_time, last_step = time.perf_counter(), start
        skipped_logged = 0
        try:
            for step in range(start, total):
                try:
                    batch = next(data_iter)
                except DynamicIDError as err:  # e.g. more corrupt records than data.max_corrupt_fraction allows
                    if step > start and (not ck_every or step % ck_every):
                        self.save(manager, state, grain_iter, force=True)  # keep the work done so far
                    manager.wait_until_finished()
                    log.error("stopping at step %d: %s (the latest checkpoint is kept)", step, err)
                    raise
                state, metrics = self.train_step(state, batch)
                done = step + 1
                if on_step is not None:
                    on_step(done, state, metrics)
                if done % log_every == 0 or done == total:
                    values = {k: float(v) for k, v in host_value(metrics).items()}
                    now = time.perf_counter()
                    values["step_time_s"] = (now - last_time) / max(done - last_step, 1)
                    last_time, last_step = now, done
                    data_stats = _loader_stats(data_iter)
                    if writer is not None:
                        writer.scalars(done, {f"train/{k}": v for k, v in values.items()})
                        if data_stats is not None:
                            writer.scalars(done, {"data/skipped_records": float(data_stats["skipped"]),
                                                  "data/seen_examples": float(data_stats["seen"])})
                        writer.flush()
                    if data_stats is not None and data_stats["skipped"] > skipped_logged:
                        skipped_logged = data_stats["skipped"]
                        recent = data_stats.get("recent_errors") or ["?"]
                        log.warning("step %d: %d corrupt records skipped so far (of %d read); last: %s", done,
                                    skipped_logged, data_stats["seen"], recent[-1])
                    if bar is not None:
                        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values.get('lr', 0):.2e}")
                    if not all(math.isfinite(v) for v in values.values()):
                        raise FloatingPointError(f"non-finite metrics at step {done}: {values}")
                if sample_every and self.task.sample_fn is not None and done % sample_every == 0:
                    self.write_samples(state, done, writer)
                if ck_every and done % ck_every == 0:
                    self.save(manager, state, grain_iter)
                if bar is not None:
                    bar.update(1)
            if total > start and (not ck_every or total % ck_every):
                self.save(manager, state, grain_iter, force=True)
            manager.wait_until_finished()
            data_stats = _loader_stats(data_iter)
            if data_stats is not None and self.is_primary:
                log.info("data: %d corrupt records skipped of %d read", data_stats["skipped"], data_stats["seen"])
        finally:
            manager.close()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        return state

    def write_samples(self, state: TrainState, step: int, writer) -> None:
        from dynamicid_jax.file_io import image_grid, save_png

        if "sample" not in self._jitted:
            self._jitted["sample"] = sh.sharded_jit(
                self.task.sample_fn, in_shardings=(self.state_sh.trainable, self.frozen_sh, self.state_sh.mutable),
                out_shardings=sh.replicated(self.mesh), mesh=self.mesh)
        params = state.ema if state.ema is not None else state.trainable
        if "sample_compiled" not in self._jitted:
            self._jitted["sample_compiled"] = self._jitted["sample"].lower(params, self.frozen, state.mutable).compile()
            barrier("sample_compiled")
        images = host_value(self._jitted["sample_compiled"](params, self.frozen, state.mutable))
        if self.is_primary:
            grid = image_grid(images, columns=min(len(images), 4))
            os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
            save_png(grid, os.path.join(self.workdir, "samples", f"step_{step:08d}.png"))
            if writer is not None:
                writer.image("samples", grid, step)


def _loader_stats(data_iter: Any) -> Mapping | None:
    """The corrupt-record counters of a ``data_pipelines.loaders`` iterator (``{"seen", "skipped",
    "recent_errors"}``); ``None`` for other iterators."""
    stats = getattr(data_iter, "stats", None)
    return stats if isinstance(stats, Mapping) and "skipped" in stats and "seen" in stats else None


def _jsonable(cfg: Any) -> Any:
    return json.loads(json.dumps(cfg, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


__all__ = [
    "CHECKPOINT_DEFAULTS", "MESH_DEFAULTS", "OPTIMIZER_DEFAULTS", "TRAIN_DEFAULTS", "Task", "TrainState",
    "Trainer", "barrier", "default_batch_shardings", "host_value", "learning_rate_schedule",
    "make_checkpoint_manager", "make_optimizer", "make_train_step", "numeric_batch", "put_batch",
    "replicated_to_host", "split_microbatches", "state_shardings", "tree_shardings", "LossFn", "PyTree",
]
