"""One denoising step of Infinite-ID (text stream + ID stream, CFG) against a plain CFG step, on the CPU.

    python benchmarks/infinite_id_step.py [--config sd15|mid] [--size 256] [--batch 1] [--repeats 3] [--save]

Cases are timed interleaved (round-robin over the repeats) so that load on a shared machine hits all of them
alike. A step here is the UNet call of the guided batch plus the guidance combination (the scheduler update is the same
elementwise work for every method). Plain CFG runs 2B rows. Infinite-ID runs 4B rows: the text and ID streams,
each with CFG. Its ID rows use mixed self-attention (twice the keys, AdaIN-mean on) in every self-attention
layer, plus the ID cross-attention. When ``dynamicid_jax.methods.saa`` is importable, DynamicID's SAA step runs
too (2B rows, LoRA everywhere and a gated ID branch). Weights are random with the real shapes; the timings do not
depend on their values. Goal (issue 6): Infinite-ID ≤ 2.1× a plain CFG step.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _random_params(abstract, seed: int):
    """Params with the abstract tree's shapes: values drawn from one shared random pool (fast at 860M params)."""
    import flax.linen as nn
    import jax
    import numpy as np

    pool = (np.random.default_rng(seed).standard_normal(1 << 20) * 0.02).astype(np.float32)

    def draw(path, leaf):
        if path[-1].key == "scale":
            return jax.numpy.ones(leaf.shape, jax.numpy.float32)
        return jax.device_put(np.resize(pool, leaf.shape))

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="sd15", choices=["sd15", "mid"],
                   help="sd15: the real UNet; mid: SD1.5 layout at half width (160/320/640/640)")
    p.add_argument("--size", type=int, default=256, help="image size in px (latent = size/8)")
    p.add_argument("--batch", type=int, default=1, help="images per step (B)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-adain", dest="adain", action="store_false")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/infinite_id_step_<date>.json")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from harness import machine, write_result
    from dynamicid_jax.methods import infinite_id as iid
    from dynamicid_jax.models import unet as U

    config = U.unet_config("sd15")
    if args.config == "mid":
        config = dataclasses.replace(config, block_out_channels=(160, 320, 640, 640), attention_head_dim=4)
    enc = iid.infinite_id_encoder_config("sd15", dim=config.cross_attention_dim)
    base = _random_params(U.abstract_params(U.UNet2DConditionModel(config)), 0)
    h, b, dim = args.size // 8, args.batch, config.cross_attention_dim
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((b, h, h, config.in_channels)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((2 * b, 77, dim)), jnp.float32)  # [uncond; cond]
    ids = jnp.asarray(rng.standard_normal((1, enc.num_tokens, dim)), jnp.float32)
    t = jnp.int32(500)
    guidance = jnp.float32(5.0)

    def guided(eps):
        u, c = jnp.split(eps, 2, axis=0)
        return u + guidance * (c - u)

    plain_unet = U.UNet2DConditionModel(config)

    @jax.jit
    def plain_step(params, x, ctx):
        return guided(plain_unet.apply({"params": params}, jnp.concatenate([x, x]), t, ctx))

    iid_unet = U.UNet2DConditionModel(config, strategy=iid.InfiniteIDAttention())
    iid_params = iid.merge_id_params(base, _random_params(iid.abstract_id_params(config), 1))
    inputs = iid.two_stream_inputs(enc.num_tokens, guided=True, adain=args.adain)

    def two_streams(txt, tokens):  # [text rows; ID rows], contexts [text; ID tokens]
        tokens = jnp.broadcast_to(tokens, (txt.shape[0],) + tokens.shape[1:])
        return jnp.concatenate([jnp.concatenate([txt, jnp.zeros_like(tokens)], 1),
                                jnp.concatenate([txt, tokens], 1)])

    @jax.jit
    def iid_step(params, x, txt, tokens):
        u, c = jnp.split(txt, 2)
        ctx = jnp.concatenate([two_streams(u, tokens), two_streams(c, tokens)])
        return guided(iid_unet.apply({"params": params}, jnp.concatenate([x, x, x, x]), t, ctx, inputs))

    cases = {"plain_cfg": (plain_step, (base, latents, text)),
             "infinite_id": (iid_step, (iid_params, latents, text, ids))}
    try:
        from dynamicid_jax.methods import saa
    except ImportError:
        saa = None
    if saa is not None:
        saa_unet = U.UNet2DConditionModel(config, strategy=saa.SAA())
        saa_params = saa.merge_params(base, _random_params(saa.abstract_saa_params(config), 2))
        saa_in = saa.saa_inputs(1, (args.size, args.size))
        saa_ids = jnp.asarray(rng.standard_normal((2 * b, 4, dim)), jnp.float32)

        @jax.jit
        def saa_step(params, x, txt, tokens):
            ctx = jnp.concatenate([txt, tokens], 1)
            return guided(saa_unet.apply({"params": params}, jnp.concatenate([x, x]), t, ctx, saa_in))

        cases["dynamicid_saa"] = (saa_step, (saa_params, latents, text, saa_ids))

    results = {}
    for name, (fn, fargs) in cases.items():  # compile + one warm-up call each
        start = time.perf_counter()
        jax.block_until_ready(fn(*fargs))
        results[name] = {"compile_s": time.perf_counter() - start, "times_s": []}
        jax.block_until_ready(fn(*fargs))
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit every case alike
        for name, (fn, fargs) in cases.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*fargs))
            results[name]["times_s"].append(time.perf_counter() - start)
    for name, r in results.items():
        r["median_s"] = statistics.median(r["times_s"])
        print(f"  {name}: {r['median_s'] * 1e3:.0f} ms median of {args.repeats} "
              f"(first call incl. compile {r['compile_s']:.1f}s)", flush=True)
    ratios = {f"{k}_over_plain_cfg": v["median_s"] / results["plain_cfg"]["median_s"]
              for k, v in results.items() if k != "plain_cfg"}
    mach = machine()
    result = {"benchmark": "infinite_id_step", "machine": mach,
              "config": {"unet": args.config, "image": args.size, "latent": h, "batch": b, "dtype": "float32",
                         "repeats": args.repeats, "id_tokens": enc.num_tokens, "adain": args.adain,
                         "mix_layers": "all self-attention layers"},
              "results": results, "ratios": ratios, "goal_infinite_id_over_plain_cfg": 2.1}
    print(f"machine: {mach['platform']}, {mach['cpu_count']} cores, jax {jax.__version__} ({mach['jax_backend']}, "
          f"{mach['device']})")
    print(f"config: {args.config} UNet, {args.size}² (latent {h}²), B={b}, fp32, {enc.num_tokens} ID tokens, "
          f"mixing in all self-attention layers, AdaIN {'on' if args.adain else 'off'}")
    for k, v in ratios.items():
        goal = "  (goal ≤ 2.1)" if k.startswith("infinite_id") else ""
        print(f"ratio {k}: {v:.2f}{goal}")
    if args.save:
        print(write_result(result, f"infinite_id_step_{mach['date']}"))


if __name__ == "__main__":
    main()
