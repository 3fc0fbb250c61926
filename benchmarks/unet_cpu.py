"""Full SD1.5 UNet forward on the CPU: ours (jit, after compile) vs diffusers PyTorch, same weights, same run.

    python benchmarks/unet_cpu.py [--size 256] [--batch 2] [--repeats 5] [--save]

Both models hold the same random weights (the torch model's, converted through our key map), so the run also
reports the full-size output difference. Goal (issue 2): ours ≤ 0.8× the PyTorch time.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=256, help="image size in px (latent = size/8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--save", action="store_true", help="write benchmarks/results/unet_cpu_<date>.json")
    args = p.parse_args()

    import jax
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from harness import machine, median_time, write_result
    from dynamicid_jax.models import unet as U
    from dynamicid_jax.weights import keymap as km

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = U.unet_config("sd15")
    torch_unet = TorchUNet(**{k: v for k, v in config.to_dict().items() if not k.startswith("_")}).eval()
    state = {k: v.detach().numpy() for k, v in torch_unet.state_dict().items()}
    ours = U.UNet2DConditionModel(config)
    params = jax.device_put(km.load_state_dict(state, U.UNET_KEYMAP, U.abstract_params(ours), source="torch"))
    del state

    h = args.size // 8
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((args.batch, h, h, 4)).astype(np.float32)
    t = np.full((args.batch,), 500, np.int32)
    ctx = rng.standard_normal((args.batch, 77, 768)).astype(np.float32)

    fwd = jax.jit(ours.apply)
    import time

    start = time.perf_counter()
    out = jax.block_until_ready(fwd({"params": params}, sample, t, ctx))
    compile_s = time.perf_counter() - start
    ours_s, ours_all = median_time(lambda: jax.block_until_ready(fwd({"params": params}, sample, t, ctx)),
                                   args.repeats)

    ts, tt, tc = torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(t.astype(np.int64)), \
        torch.from_numpy(ctx)
    with torch.inference_mode():
        ref = torch_unet(ts, tt, tc).sample.numpy().transpose(0, 2, 3, 1)
        torch_s, torch_all = median_time(lambda: torch_unet(ts, tt, tc), args.repeats)
    diff = float(np.abs(np.asarray(out) - ref).max())
    result = {"benchmark": "unet_cpu", "machine": machine(), "torch": torch.__version__, "threads": args.threads,
              "config": {"model": "sd15 UNet (random weights)", "image": args.size, "latent": h, "batch": args.batch,
                         "dtype": "float32", "repeats": args.repeats},
              "ours_compile_s": compile_s, "ours_median_s": ours_s, "ours_times_s": ours_all,
              "torch_median_s": torch_s, "torch_times_s": torch_all, "ratio_ours_over_torch": ours_s / torch_s,
              "max_abs_diff": diff, "max_abs_ref": float(np.abs(ref).max())}
    print(f"machine: {result['machine']['platform']}, {result['machine']['cpu_count']} cores, "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")
    print(f"config: SD1.5 UNet, {args.size}² (latent {h}²), batch {args.batch}, fp32, {args.repeats} repeats")
    print(f"ours (jax.jit): {ours_s * 1e3:.0f} ms median (compile {compile_s:.1f}s)")
    print(f"diffusers torch: {torch_s * 1e3:.0f} ms median")
    print(f"ratio ours/torch: {ours_s / torch_s:.2f}  (goal ≤ 0.8)   max |Δε| = {diff:.2e}")
    if args.save:
        print(write_result(result, f"unet_cpu_{result['machine']['date']}"))


if __name__ == "__main__":
    main()
