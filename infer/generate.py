"""Text-to-image from the command line.

    python -m infer.generate --model PATH --prompt "a photo of a cat" --out cat.png
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="diffusers SD folder or single-file .safetensors checkpoint")
    p.add_argument("--config", help="for single-file checkpoints: a diffusers folder holding the configs")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "dpm++2m", "euler"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (params stay fp32; scheduler math is fp32)")
    p.add_argument("--out", required=True, help="PNG path; a batch is saved as one grid")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import jax.numpy as jnp
    import numpy as np

    from dynamicid_jax.image_io import image_grid, save_png
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion

    start = time.perf_counter()
    print(f"loading {args.model} …", file=sys.stderr, flush=True)
    sd = StableDiffusion.from_pretrained(args.model, config=args.config, scheduler=args.scheduler,
                                         dtype=getattr(jnp, args.dtype))
    print(f"loaded in {time.perf_counter() - start:.1f}s; compiling the sampler "
          f"({len(args.prompt)}×{args.height}×{args.width}, {args.steps} steps) …", file=sys.stderr, flush=True)
    images = sd.generate(args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                         steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed)
    t = sd.last_timings
    print(f"compile {t.get('compile_s', 0.0):.1f}s, sampling {t['run_s']:.2f}s "
          f"({args.steps / t['run_s']:.2f} it/s incl. text encoding and VAE decode)", file=sys.stderr)
    save_png(images[0] if len(images) == 1 else image_grid(np.asarray(images)), args.out)
    print(os.path.abspath(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
