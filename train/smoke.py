"""A seconds-long synthetic task that exercises the whole train loop: check a (multi-host) setup before a run.

The model is small but has everything a real stage has: a frozen projection (kept out of the optimizer), a
trainable conv / dense net whose params carry logical axes (so ``fsdp`` really shards them), a mutable
collection updated by every step (like BatchNorm statistics) and a checkpointable Grain pipeline whose records
are a pure function of their index. One process::

    python -m train.smoke --workdir /tmp/smoke --steps 20

Several processes (each runs the same command with its own ``--process-id``; on TPU / Slurm the arguments of
``jax.distributed.initialize`` are found automatically and may be left out)::

    python -m train.smoke --workdir /tmp/smoke --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0

``--save-params FILE`` writes the final trainable params (gathered, every process gets the same) as ``.npz``.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

IMAGE = 8  # records are [IMAGE, IMAGE, CHANNELS]
CHANNELS = 4


def _model():
    import flax.linen as nn
    import jax

    from dynamicid_jax.models import layers

    class SmokeNet(nn.Module):
        """conv → GroupNorm → SiLU → per-pixel MLP (residual) → conv."""

        @nn.compact
        def __call__(self, x):
            h = layers.conv(16, 3, padding=1, name="conv_in")(x)
            h = jax.nn.silu(layers.group_norm(4, 1e-5, name="norm")(h))
            u = layers.gelu(layers.dense(32, name="ff_in")(h))
            h = h + layers.dense(16, name="ff_out", axes=("mlp", "embed"))(u)
            return layers.conv(CHANNELS, 3, padding=1, name="conv_out")(h)

    class FrozenProjection(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.dense(CHANNELS, name="proj", axes=("embed", "mlp"))(x)

    return SmokeNet(), FrozenProjection()


def smoke_task(seed: int = 0):
    """The :class:`~train.loop.Task`: loss = MSE(net(frozen_proj(x)), y) on [B, 8, 8, 4] records."""
    import jax
    import jax.numpy as jnp

    from train.loop import Task

    net, proj = _model()
    x0 = jnp.zeros((1, IMAGE, IMAGE, CHANNELS), jnp.float32)
    abstract_trainable = jax.eval_shape(net.init, jax.random.key(0), x0)["params"]
    abstract_frozen = jax.eval_shape(proj.init, jax.random.key(0), x0)["params"]
    frozen = jax.tree_util.tree_map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                                    proj.init(jax.random.key(seed + 100), x0)["params"],
                                    is_leaf=lambda x: hasattr(x, "unbox"))
    abstract_mutable = {"stats": {"mean": jax.ShapeDtypeStruct((CHANNELS,), jnp.float32),
                                  "count": jax.ShapeDtypeStruct((), jnp.int32)}}

    def init(rng, frozen):
        params = net.init(rng, x0)["params"]
        return params, {"stats": {"mean": jnp.zeros((CHANNELS,), jnp.float32), "count": jnp.zeros((), jnp.int32)}}

    def loss_fn(trainable, frozen, mutable, batch, rng):
        x = proj.apply({"params": frozen}, batch["x"])
        noise = 0.01 * jax.random.normal(rng, x.shape, x.dtype)  # the per-step PRNG must reach the loss
        pred = net.apply({"params": trainable}, x + noise)
        loss = jnp.mean(jnp.square(pred - batch["y"]))
        stats = mutable["stats"]
        mean = 0.9 * stats["mean"] + 0.1 * jnp.mean(batch["y"], axis=(0, 1, 2))
        new_mutable = {"stats": {"mean": mean, "count": stats["count"] + 1}}
        return loss, ({"pred_abs": jnp.mean(jnp.abs(pred))}, new_mutable)

    def sample_fn(trainable, frozen, mutable):
        x = jnp.linspace(-1, 1, 2 * IMAGE * IMAGE * CHANNELS).reshape(2, IMAGE, IMAGE, CHANNELS)
        out = net.apply({"params": trainable}, proj.apply({"params": frozen}, x))[..., :3]
        return jnp.clip((out + 1) * 127.5, 0, 255).astype(jnp.uint8)

    return Task(init=init, abstract_trainable=abstract_trainable, abstract_frozen=abstract_frozen, frozen=frozen,
                loss_fn=loss_fn, abstract_mutable=abstract_mutable, sample_fn=sample_fn,
                frozen_source={"kind": "random", "seed": seed + 100})


def smoke_record(index: int) -> dict:
    """Record ``index``: a deterministic function of the index only."""
    import numpy as np

    rng = np.random.default_rng(int(index))
    x = rng.standard_normal((IMAGE, IMAGE, CHANNELS)).astype(np.float32)
    y = (np.tanh(x[..., ::-1]) + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    return {"x": x, "y": y}


def smoke_dataset(local_batch: int, *, process_index: int = 0, process_count: int = 1, num_records: int = 256,
                  seed: int = 0):
    """This process's Grain iterator: shuffle (seeded) → repeat → this process's slice → batch."""
    import grain

    ds = (grain.MapDataset.range(num_records).seed(seed).shuffle().repeat()
          [process_index::process_count].map(smoke_record).batch(local_batch, drop_remainder=True))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()


class EmulatedProcesses:
    """One process reading what ``n`` processes would read, concatenated in process order (= the global batch of
    an ``n``-process run). Checkpointable like a Grain iterator."""

    def __init__(self, local_batch: int, n: int, **kw: Any):
        self.iters = [smoke_dataset(local_batch, process_index=i, process_count=n, **kw) for i in range(n)]

    def __iter__(self):
        return self

    def __next__(self):
        import numpy as np

        parts = [next(it) for it in self.iters]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def smoke_config(steps: int, **over: Any) -> dict:
    cfg = {"train": {"seed": 0, "steps": steps, "log_every": 1, "sample_every": 0, "progress_bar": False},
           "optimizer": {"lr": 3e-3, "clip_grad_norm": 1.0, "weight_decay": 1e-2},
           "checkpoint": {"every": 1, "keep": 3, "async": True},
           "mesh": {"data": -1, "fsdp": 1, "tensor": 1}}
    for section, values in over.items():
        cfg[section].update(values)
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--emulate-processes", type=int, default=1, help="one process reading as N would")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-process runs)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--save-params", default=None, help="write the final trainable params to this .npz")
    p.add_argument("--step-log", default=None, help="append each finished step number to this file")
    p.add_argument("--ema", type=float, default=None)
    args = p.parse_args(argv)

    import jax

    if args.coordinator or args.num_processes:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    import numpy as np

    from train.loop import Trainer, replicated_to_host

    n_proc, pid = jax.process_count(), jax.process_index()
    if args.global_batch % (n_proc * args.emulate_processes):
        raise SystemExit(f"--global-batch {args.global_batch} must divide by the number of processes")
    cfg = smoke_config(args.steps, checkpoint={"every": args.checkpoint_every},
                       mesh={"fsdp": args.fsdp}, train={"ema_decay": args.ema})
    trainer = Trainer(smoke_task(), cfg, args.workdir)
    if args.emulate_processes > 1:
        data = EmulatedProcesses(args.global_batch // args.emulate_processes, args.emulate_processes)
    else:
        data = smoke_dataset(args.global_batch // n_proc, process_index=pid, process_count=n_proc)

    def on_step(step, state, metrics):
        if args.step_log and pid == 0:
            with open(args.step_log, "a") as f:
                f.write(f"{step}\n")

    state = trainer.fit(data, on_step=on_step)
    params = replicated_to_host(state.trainable)
    if args.save_params:
        from flax import traverse_util

        flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
        root, ext = os.path.splitext(args.save_params)
        np.savez(f"{root}.p{pid}{ext or '.npz'}" if n_proc > 1 else args.save_params, **flat)
    if args.coordinator or args.num_processes:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    from dynamicid_jax.errors import run_cli

    raise SystemExit(run_cli(main))
