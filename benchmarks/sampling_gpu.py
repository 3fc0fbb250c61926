"""Text-to-image sampling speed: our jitted sampler (bf16, cuDNN attention) vs diffusers (fp16, SDPA), same run.

    python benchmarks/sampling_gpu.py --model SD15_FOLDER [--steps 50] [--size 512] [--batches 1,4] [--save]
    python benchmarks/sampling_gpu.py --random-sd15 /tmp/sd15-random ...   # writes random SD1.5 weights first
    python benchmarks/sampling_gpu.py --model SDXL_FOLDER --size 1024 --steps 30   # SDXL: picked from the folder
    python benchmarks/sampling_gpu.py --random-sdxl /tmp/sdxl-random --size 1024 --steps 30 --batches 1
    python benchmarks/sampling_gpu.py --random-sdxl /tmp/sdxl-tiny --tiny --size 64 --steps 4 --batches 1  # CPU smoke

SDXL runs Euler (its own scheduler) with guidance 5.0 on both sides; SD1.x runs DDIM with guidance 7.5.

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
        scheduler=DDIMScheduler.from_config(strip(cfg["scheduler"]) | {"clip_sample": False}), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(os.path.join(folder, "tokenizer"))
    shutil.copytree(default_tokenizer_dir(), os.path.join(folder, "tokenizer"))
    return folder


def write_random_sdxl(folder: str, tiny: bool = False) -> str:
    """A diffusers SDXL folder with random weights: SDXL base 1.0's architecture, or (``tiny``) the test suite's
    tiny SDXL-shaped model (tests/tiny_sdxl.py) for a CPU smoke run."""
    if os.path.isdir(folder):
        return folder
    if tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from tiny_sdxl import make_tiny_sdxl

        return make_tiny_sdxl(folder)[0]
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dynamicid_jax.tokenizer import SDXL_PAD_TOKEN, load_tokenizer
    from dynamicid_jax.weights.single_file_sdxl import sdxl_configs

    cfg = sdxl_configs()
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_") and k not in (  # noqa: E731
        "architectures", "model_type")}
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**strip(cfg["unet"])), vae=AutoencoderKL(**strip(cfg["vae"])),
        text_encoder=CLIPTextModel(CLIPTextConfig(**strip(cfg["text_encoder"]))),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**strip(cfg["text_encoder_2"]))),
        tokenizer=load_tokenizer(), tokenizer_2=load_tokenizer(pad_token=SDXL_PAD_TOKEN),
        scheduler=EulerDiscreteScheduler.from_config(strip(cfg["scheduler"])))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", help="diffusers SD folder")
    p.add_argument("--random-sd15", metavar="DIR", help="create (if missing) and use a random-weight SD1.5 folder")
    p.add_argument("--random-sdxl", metavar="DIR", help="create (if missing) and use a random-weight SDXL folder")
    p.add_argument("--tiny", action="store_true", help="with --random-sdxl: the tests' tiny SDXL (CPU smoke run)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=None, help="default 512 (SD1.x), 1024 (SDXL)")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="skip the diffusers reference")
    p.add_argument("--save", action="store_true")
    args = p.parse_args()
    if sum(map(bool, (args.model, args.random_sd15, args.random_sdxl))) != 1:
        p.error("give one of --model, --random-sd15, --random-sdxl")
    if args.tiny and not args.random_sdxl:
        p.error("--tiny goes with --random-sdxl")
    folder = args.model or (write_random_sd15(args.random_sd15) if args.random_sd15
                            else write_random_sdxl(args.random_sdxl, tiny=args.tiny))

    import jax
    import jax.numpy as jnp

    from harness import machine, median_time, write_result
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion
    from dynamicid_jax.pipelines.stable_diffusion_xl import StableDiffusionXL
    from dynamicid_jax.weights.keymap import is_sdxl

    on_gpu = jax.default_backend() == "gpu"
    xl = is_sdxl(folder)
    scheduler, guidance = ("euler", 5.0) if xl else ("ddim", 7.5)
    args.size = args.size or (1024 if xl else 512)
    sd = (StableDiffusionXL if xl else StableDiffusion).from_pretrained(
        folder, scheduler=scheduler, dtype=jnp.bfloat16 if on_gpu else jnp.float32)
    result = {"benchmark": "sampling_gpu", "machine": machine(), "model": folder,
              "config": {"backbone": "sdxl" if xl else "sd15", "size": args.size, "steps": args.steps,
                         "guidance": guidance, "scheduler": scheduler,
                         "ours_dtype": "bfloat16" if on_gpu else "float32"}, "runs": []}
    pipe = None
    if not args.no_torch:
        import torch
        from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        if xl:  # fp16 diffusers upcasts SDXL's VAE for the decode itself (force_upcast), as we do
            pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                           feature_extractor=None).to(device)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        result["config"]["torch"] = {"version": torch.__version__, "device": device, "dtype": str(dtype)}
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = ["a photo of an astronaut riding a horse on the moon"] * batch
        run = lambda: sd.generate(prompts, height=args.size, width=args.size, steps=args.steps,  # noqa: E731
                                  guidance_scale=guidance, seed=0)
        run()  # compile
        compile_s = sd.last_timings.get("compile_s")
        ours_s, _ = median_time(run, args.repeats, warmup=0)
        row = {"batch": batch, "ours_compile_s": compile_s, "ours_s": ours_s, "ours_it_s": args.steps / ours_s}
        if pipe is not None:
            def theirs():
                out = pipe(prompts, height=args.size, width=args.size, num_inference_steps=args.steps,
                           guidance_scale=guidance, output_type="np")
                if result["config"]["torch"]["device"] == "cuda":
                    torch.cuda.synchronize()
                return out
            torch_s, _ = median_time(theirs, args.repeats, warmup=1)
            row.update(torch_s=torch_s, torch_it_s=args.steps / torch_s, speedup=torch_s / ours_s)
        result["runs"].append(row)
        print(f"batch {batch}: ours {row['ours_it_s']:.2f} it/s (compile {compile_s:.1f}s)" +
              (f", diffusers {row['torch_it_s']:.2f} it/s, speedup ×{row['speedup']:.2f}" if pipe else ""))
    m = result["machine"]
    print(f"machine: {m['device']} ({m['jax_backend']}), jax {m['jax']}; {'SDXL' if xl else 'SD1.x'} {args.size}², "
          f"{args.steps} {scheduler} steps, CFG {guidance}")
    if args.save:
        print(write_result(result, f"sampling_{'sdxl_' if xl else ''}{m['jax_backend']}_{m['date']}"))


if __name__ == "__main__":
    main()
