"""What SAA costs: one SD1.5 UNet step with DynamicID's SAA (1 and 3 identities) vs the plain UNet, same run.

    python benchmarks/saa_overhead.py [--size 512] [--batch 2] [--repeats 5] [--dtype float32] [--save]

Random SD1.5-architecture weights (values do not matter for timing). The SAA UNet carries everything DynamicID
adds at inference: rank-128 LoRA on q/k/v/out of all 32 attention layers, the ID branch (``to_k_ip``/``to_v_ip``,
fp32 softmax) of the 16 cross-attentions, the gate (fp32 min–max over the queries), the layout boost and the
regional routing (N boxes for N identities, equal strips). Also timed: SAA with ``activate_query=False`` (LoRA +
ungated ID branch, the "w/o SAA" baseline) to separate the gate/routing cost from the rest. Variants are timed
interleaved (one call of each per round) so that load changes on a shared machine hit all of them alike.
``batch`` 2 = one image with classifier-free guidance. Goal (issue 3): SAA overhead ≤ 10 % of a step at 512².
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=512, help="image size in px (latent = size/8); 512 is the goal")
    p.add_argument("--batch", type=int, default=2, help="UNet rows (2 = one image with CFG)")
    p.add_argument("--ids", default="1,3", help="identity counts to time")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/saa_overhead_<device>_<date>.json")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from harness import machine, write_result

    from dynamicid_jax.methods import saa as S
    from dynamicid_jax.models import unet as U

    dtype = getattr(jnp, args.dtype)
    config = U.unet_config("sd15")
    strategy = S.SAA()  # rank 128, 4 tokens per identity
    start = time.perf_counter()
    base = U.UNet2DConditionModel(config, dtype=dtype)
    params = U.init_params(base, jax.random.key(0))
    saa_params = S.init_saa_params(config, jax.random.key(1), strategy)
    saa_params = jax.tree_util.tree_map(lambda x: x + 0.01 if x.ndim == 2 and not x.any() else x, saa_params)
    merged = S.merge_params(params, saa_params)
    saa_unet = U.UNet2DConditionModel(config, strategy=strategy, dtype=dtype)
    init_s = time.perf_counter() - start

    h = args.size // 8
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((args.batch, h, h, 4)), jnp.float32)
    t = jnp.full((args.batch,), 500, jnp.int32)
    text = rng.standard_normal((args.batch, 77, config.cross_attention_dim)).astype(np.float32)

    plain_fn = jax.jit(lambda p, x, t, c: base.apply({"params": p}, x, t, c))
    saa_fn = jax.jit(lambda p, x, t, c, inp: saa_unet.apply({"params": p}, x, t, c, inp))
    variants = {"plain": (plain_fn, (params, sample, t, jnp.asarray(text)))}
    for n in (int(v) for v in args.ids.split(",")):
        ids = rng.standard_normal((args.batch, 4 * n, config.cross_attention_dim)).astype(np.float32)
        ctx = jnp.asarray(np.concatenate([text, ids], axis=1))
        variants[f"saa_{n}id"] = (saa_fn, (merged, sample, t, ctx, S.saa_inputs(n, (args.size, args.size),
                                                                                 strength=2.0)))
        if n == 1:
            variants["saa_1id_no_gate"] = (saa_fn, (merged, sample, t, ctx,
                                                    S.saa_inputs(1, (args.size, args.size), activate_query=False)))

    compile_s, times = {}, {name: [] for name in variants}
    for name, (fn, fargs) in variants.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*fargs))  # compile + warm-up
        compile_s[name] = time.perf_counter() - start
        print(f"compiled {name} in {compile_s[name]:.1f}s", file=sys.stderr, flush=True)
    for _ in range(args.repeats):
        for name, (fn, fargs) in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*fargs))
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in times.items()}
    overhead = {name: med[name] / med["plain"] - 1.0 for name in med if name != "plain"}
    spread = {name: (max(v) - min(v)) / med[name] for name, v in times.items()}  # run-to-run noise

    info = machine()
    result = {"benchmark": "saa_overhead", "machine": info,
              "config": {"model": "sd15 UNet (random weights)", "image": args.size, "latent": h, "batch": args.batch,
                         "dtype": args.dtype, "repeats": args.repeats, "lora_rank": strategy.lora_rank,
                         "boost_strength": 2.0, "routing": "N boxes (equal strips)"},
              "init_s": init_s, "compile_s": compile_s, "median_s": med, "times_s": times,
              "overhead_vs_plain": overhead, "spread_max_min_over_median": spread}
    print(f"machine: {info['platform']}, {info['cpu_count']} cores, jax {jax.__version__} ({info['jax_backend']}: "
          f"{info['device']})")
    print(f"config: SD1.5 UNet step, {args.size}² (latent {h}²), batch {args.batch}, {args.dtype}, "
          f"SAA rank {strategy.lora_rank}, {args.repeats} interleaved repeats")
    for name in med:
        extra = "" if name == "plain" else f"   overhead {100 * overhead[name]:+.1f} %"
        print(f"  {name:16s} {med[name] * 1e3:9.1f} ms median (spread {100 * spread[name]:.0f} %){extra}")
    worst = max(v for k, v in overhead.items() if k.startswith("saa_") and "no_gate" not in k)
    print(f"worst SAA overhead {100 * worst:.1f} % of a plain step (goal ≤ 10 % at 512²"
          f"{'' if args.size == 512 else f'; measured at {args.size}²'})")
    noise = max(spread.values())
    if noise > 0.05:
        print(f"NOTE: run-to-run spread up to {100 * noise:.0f} % (a shared or busy machine?): overheads smaller than "
              f"that are not resolved by this run")
    if args.save:
        device = "gpu" if info["jax_backend"] == "gpu" else info["jax_backend"]
        print(write_result(result, f"saa_overhead_{device}_{args.size}_{info['date']}"))


if __name__ == "__main__":
    main()
