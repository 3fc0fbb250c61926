"""What precomputed inputs save: the demo's stage-1 step reading the shards' VAE moments and image-encoder features
against the same step encoding pixels with both frozen encoders, same batches, same run.

    make demo                                    # once: the world, face models and shards this reads
    python benchmarks/stage1_inputs.py --demo demo_out [--base assets/synthface_base] [--steps 40] [--rounds 3] [--save]

The config is the demo's (``train/configs/synthface_stage1.yaml`` on the shipped base, batch 8, 64² images). Both
variants are built from the same shards with the same loader seed, so they see the same examples; the first step's
losses are compared (the inputs are the same numbers, computed once in the shard builder or on every step here).
Variants are timed interleaved (``--steps`` of one, then of the other, ``--rounds`` times) so that load changes on
a shared machine hit both alike. docs/demo.md (What moved what) quotes the result.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


#: the batch entries the two variants differ in
INPUTS = ("target_pixels", "target_latent_moments", "ref_clip_pixels", "ref_clip_features")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--demo", default="demo_out", help="a finished `make demo` output folder")
    p.add_argument("--base", default=os.path.join(ROOT, "assets", "synthface_base"),
                   help="the SD folder the demo trained on (default: the shipped SynthFace base)")
    p.add_argument("--steps", type=int, default=40, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--save", action="store_true", help="write benchmarks/results/stage1_inputs_<device>_<date>.json")
    args = p.parse_args()
    work = os.path.join(args.demo, "work")
    shards, encoder = os.path.join(work, "shards"), os.path.join(work, "face_models", "image_encoder")
    if not os.path.isfile(os.path.join(shards, "manifest.json")) or not os.path.isdir(encoder):
        raise SystemExit(f"--demo: {args.demo!r} holds no finished demo (run `make demo` first)")
    if not os.path.isfile(os.path.join(args.base, "model_index.json")):
        raise SystemExit(f"--base: {args.base!r} is not a diffusers folder (model_index.json missing)")

    import tempfile

    import jax
    from harness import machine, write_result

    from train import loop, stage1

    config = os.path.join(ROOT, "train", "configs", "synthface_stage1.yaml")
    variants = {"precomputed": ["data.latents=precomputed", "data.clip=precomputed"],
                "pixels": ["data.latents=pixels", "data.clip=pixels"]}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in variants.items():
            cfg = stage1.load(config, [f"model.base={args.base}", f"model.image_encoder={encoder}",
                                       f"data.shards={shards}", f"workdir={tmp}/{name}", *extra])
            stage = stage1.Stage1(cfg)
            data = stage1.make_data(cfg, stage.clip_size)
            batches = [next(data) for _ in range(args.steps + 1)]
            trainer = loop.Trainer(stage.task(), cfg, f"{tmp}/{name}")
            state = trainer.init_state()
            start = time.perf_counter()
            state, metrics = trainer.train_step(state, batches[0])
            first_loss = float(jax.device_get(metrics["loss"]))
            runs[name] = {"trainer": trainer, "state": state, "batches": batches[1:], "first_loss": first_loss,
                          "first_step_s": time.perf_counter() - start, "times": [],
                          "keys": sorted(k for k in batches[0] if k in INPUTS)}
        for _ in range(args.rounds):
            for run in runs.values():
                state, start = run["state"], time.perf_counter()
                for batch in run["batches"]:
                    state, metrics = run["trainer"].train_step(state, batch)
                jax.block_until_ready(metrics)
                run["times"].append((time.perf_counter() - start) / len(run["batches"]))
                run["state"] = state
    ms = {name: 1000 * statistics.median(run["times"]) for name, run in runs.items()}
    result = {"machine": machine(), "config": {"stage1": "train/configs/synthface_stage1.yaml",
                                               "batch": int(cfg["data"]["batch_size"]),
                                               "resolution": int(cfg["data"]["resolution"]), "steps": args.steps,
                                               "rounds": args.rounds},
              "step_ms": ms, "ratio_precomputed_over_pixels": ms["precomputed"] / ms["pixels"],
              "first_loss": {name: run["first_loss"] for name, run in runs.items()},
              "first_loss_abs_diff": abs(runs["precomputed"]["first_loss"] - runs["pixels"]["first_loss"]),
              "batch_inputs": {name: run["keys"] for name, run in runs.items()},
              "compile_and_first_step_s": {name: run["first_step_s"] for name, run in runs.items()}}
    print(f"machine: {result['machine']}")
    for name in runs:
        print(f"{name:12s} {ms[name]:7.1f} ms / step  (inputs {', '.join(runs[name]['keys'])}; first loss "
              f"{runs[name]['first_loss']:.6f})")
    print(f"ratio precomputed / pixels: {result['ratio_precomputed_over_pixels']:.2f}; "
          f"|Δ first loss| {result['first_loss_abs_diff']:.2e}")
    if args.save:
        device = result["machine"]["jax_backend"]
        print("wrote", write_result(result, f"stage1_inputs_{device}_{result['machine']['date']}"))


if __name__ == "__main__":
    main()
