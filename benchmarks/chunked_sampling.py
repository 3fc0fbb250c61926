"""Chunked sampling (Ctrl-C stops within about a second) against the single-program loop it replaced.

    python benchmarks/chunked_sampling.py --model TINY_SD_DIR [--steps 100] [--repeats 7]

Times ``StableDiffusion.generate`` (denoising in chunks of one compiled program, ~1 s each, then a decode program)
against the previous design, one jitted program doing text encoding, the whole ``fori_loop`` and the decode,
interleaved on the same model, prompts and noise, and checks the images are equal. Then measures how long a long
generation takes to stop after SIGINT. Writes ``results/chunked_sampling.json``.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import machine, write_result  # noqa: E402


def single_program(sd, steps: int, guided: bool):
    """The previous sampler: one jit over text encoding, the whole loop and the decode."""
    import jax

    from dynamicid_jax.models.vae import decode_latents
    from dynamicid_jax.pipelines.sampling import denoise, to_uint8

    def run(params, cond_ids, uncond_ids, noise, guidance_scale):
        encode = lambda ids: sd.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state  # noqa
        uncond = encode(uncond_ids) if guided else None
        latents = denoise(sd.unet, params["unet"], sd.scheduler, steps, noise, encode(cond_ids), guidance_scale,
                          uncond_context=uncond)
        return to_uint8(decode_latents(sd.vae, params["vae"], latents))

    return jax.jit(run)


def interrupt_latency(generate) -> dict:
    """Run a long generation (already compiled) and SIGINT this process 2 s into sampling; time until the
    ``KeyboardInterrupt`` arrives (one chunk at most)."""
    import threading

    sent = []

    def fire():
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIGINT "ignored"
    generate()  # compile for this step count's shapes first (the step count is part of the program's shapes)
    timer = threading.Timer(2.0, fire)
    t0 = time.perf_counter()
    timer.start()
    try:
        generate()
        return {"interrupted": False, "seconds": time.perf_counter() - t0}
    except KeyboardInterrupt:
        return {"interrupted": True, "seconds_to_stop": time.perf_counter() - sent[0]}


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion
    from dynamicid_jax.tokenizer import tokenize

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--interrupt-steps", type=int, default=300, help="a run long enough to interrupt")
    args = p.parse_args()
    sd = StableDiffusion.from_pretrained(args.model)
    prompts, guidance = ["a photo of a cat"], 7.5
    chunked = lambda: sd.generate(prompts, height=args.size, width=args.size, steps=args.steps,  # noqa: E731
                                  guidance_scale=guidance, seed=0)
    f = sd.vae_scale_factor
    noise = jax.random.normal(jax.random.key(0), (1, args.size // f, args.size // f, sd.unet.config.in_channels))
    old_args = (sd.params, jnp.asarray(tokenize(sd.tokenizer, prompts)), jnp.asarray(tokenize(sd.tokenizer, [""])),
                noise, jnp.float32(guidance))
    old = single_program(sd, args.steps, True).lower(*old_args).compile()
    single = lambda: np.asarray(jax.block_until_ready(old(*old_args)))  # noqa: E731
    same = bool(np.array_equal(chunked(), single()))
    times = {"chunked": [], "single_program": []}
    for _ in range(args.repeats):  # interleaved, so background load hits both alike
        for name, fn in (("chunked", chunked), ("single_program", single)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"machine": machine(), "steps": args.steps, "size": args.size, "images_equal": same,
              "median_s": med, "times_s": times, "chunked_over_single": med["chunked"] / med["single_program"]}
    result["interrupt"] = interrupt_latency(lambda: sd.generate(prompts, height=args.size, width=args.size,
                                                                steps=args.interrupt_steps, guidance_scale=guidance,
                                                                seed=0))
    print(result)
    print(write_result(result, "chunked_sampling"))


if __name__ == "__main__":
    main()
