"""Text-to-image sampling speed: our jitted sampler (bf16, cuDNN attention) vs diffusers (fp16, SDPA), same run.

    python benchmarks/sampling_gpu.py --model SD15_FOLDER [--steps 50] [--size 512] [--batches 1,4] [--save]
    python benchmarks/sampling_gpu.py --random-sd15 /tmp/sd15-random ...   # writes random SD1.5 weights first

Reports UNet iterations per second (steps × CFG batches / loop time, text encoding and VAE decode included) for
both, and the ratio. Goal (issue 2): ≥ 1.5× diffusers and ≥ 100 it/s on an H100 at 512², batch 1.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def write_random_sd15(folder: str) -> str:
    """A diffusers SD1.5 folder with random weights of the real architecture (torch + diffusers needed)."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dynamicid_jax.tokenizer import default_tokenizer_dir, load_tokenizer
    from dynamicid_jax.weights.single_file import sd15_configs

    if os.path.isdir(folder):
        return folder
    cfg = sd15_configs()
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**strip(cfg["unet"])), vae=AutoencoderKL(**strip(cfg["vae"])),
        text_encoder=CLIPTextModel(CLIPTextConfig(**strip(cfg["text_encoder"]))), tokenizer=load_tokenizer(),
        scheduler=DDIMScheduler(**strip(cfg["scheduler"]) | {"clip_sample": False}), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(os.path.join(folder, "tokenizer"))
    shutil.copytree(default_tokenizer_dir(), os.path.join(folder, "tokenizer"))
    return folder


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", help="diffusers SD folder")
    p.add_argument("--random-sd15", metavar="DIR", help="create (if missing) and use a random-weight SD1.5 folder")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="skip the diffusers reference")
    p.add_argument("--save", action="store_true")
    args = p.parse_args()
    if not (args.model or args.random_sd15):
        p.error("give --model or --random-sd15")
    folder = args.model or write_random_sd15(args.random_sd15)

    import jax
    import jax.numpy as jnp

    from common import machine, median_time, write_result
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion

    on_gpu = jax.default_backend() == "gpu"
    sd = StableDiffusion.from_pretrained(folder, scheduler="ddim", dtype=jnp.bfloat16 if on_gpu else jnp.float32)
    result = {"benchmark": "sampling_gpu", "machine": machine(), "model": folder,
              "config": {"size": args.size, "steps": args.steps, "guidance": 7.5, "scheduler": "ddim",
                         "ours_dtype": "bfloat16" if on_gpu else "float32"}, "runs": []}
    pipe = None
    if not args.no_torch:
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                       feature_extractor=None).to(device)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        result["config"]["torch"] = {"version": torch.__version__, "device": device, "dtype": str(dtype)}
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = ["a photo of an astronaut riding a horse on the moon"] * batch
        run = lambda: sd.generate(prompts, height=args.size, width=args.size, steps=args.steps, seed=0)  # noqa
        run()  # compile
        compile_s = sd.last_timings.get("compile_s")
        ours_s, _ = median_time(run, args.repeats, warmup=0)
        row = {"batch": batch, "ours_compile_s": compile_s, "ours_s": ours_s, "ours_it_s": args.steps / ours_s}
        if pipe is not None:
            def theirs():
                out = pipe(prompts, height=args.size, width=args.size, num_inference_steps=args.steps,
                           output_type="np")
                if result["config"]["torch"]["device"] == "cuda":
                    torch.cuda.synchronize()
                return out
            torch_s, _ = median_time(theirs, args.repeats, warmup=1)
            row.update(torch_s=torch_s, torch_it_s=args.steps / torch_s, speedup=torch_s / ours_s)
        result["runs"].append(row)
        print(f"batch {batch}: ours {row['ours_it_s']:.2f} it/s (compile {compile_s:.1f}s)" +
              (f", diffusers {row['torch_it_s']:.2f} it/s, speedup ×{row['speedup']:.2f}" if pipe else ""))
    m = result["machine"]
    print(f"machine: {m['device']} ({m['jax_backend']}), jax {m['jax']}; {args.size}², {args.steps} DDIM steps, CFG")
    if args.save:
        print(write_result(result, f"sampling_{m['jax_backend']}_{m['date']}"))


if __name__ == "__main__":
    main()
