"""The ``--method infinite-id`` part of ``python -m infer.generate``: extra arguments and the run.

``add_arguments(parser)`` adds the Infinite-ID options to the generate parser (none of them required, so the
plain text-to-image method keeps working). ``run(args)`` expects the generate options as well (``model``,
``config``, ``prompt``, ``negative_prompt``, ``height``, ``width``, ``steps``, ``guidance_scale``, ``seed``,
``scheduler``, ``dtype``, ``out``) and the options every identity method shares (``reference``,
``image_encoder``, ``analyzer``, ``analyzer_root``, ``id_scale``). ``steps`` / ``guidance_scale`` left at ``None``
take the Infinite-ID defaults
(30 steps, guidance 5.0).

    python -m infer.generate --method infinite-id --model sd15/ --infinite-id-weights iid/ \\
        --image-encoder clip-h/ --reference me.jpg --prompt "a man in oil painting style" --out me.png
"""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("Infinite-ID (--method infinite-id; also --reference, --image-encoder, "
                                  "--analyzer, --analyzer-root, --id-scale)")
    g.add_argument("--infinite-id-weights", metavar="DIR", help="folder with infinite_id.safetensors/.json")
    g.add_argument("--no-adain", dest="adain", action="store_false", help="turn AdaIN-mean off")
    g.add_argument("--mix-steps", default="0:", metavar="START:END",
                   help="denoising steps with mixed attention, START ≤ i < END (END empty = to the last; '0:0' off)")
    g.add_argument("--mix-layers", default="all",
                   help="'all', or comma-separated name prefixes of the self-attention layers that mix, "
                        "e.g. 'up_blocks,mid_block'")
    g.add_argument("--save-text-stream", metavar="PNG", default=None,
                   help="also save the text stream (plain text-to-image with the same seed)")
    return parser


def parse_mix_steps(text: str) -> tuple[int, int | None]:
    try:
        start, end = text.split(":")
        return int(start or 0), (int(end) if end.strip() else None)
    except ValueError:
        raise ValueError(f"--mix-steps must look like START:END (e.g. '0:' or '5:25'), got {text!r}") from None


def parse_mix_layers(text: str) -> tuple[str, ...] | None:
    if text.strip().lower() == "all":
        return None
    prefixes = tuple(p.strip() for p in text.split(",") if p.strip())
    if not prefixes:
        raise ValueError(f"--mix-layers must be 'all' or comma-separated layer-name prefixes, got {text!r}")
    return prefixes


def run(args: argparse.Namespace) -> int:
    missing = [flag for flag, value in (("--reference", args.reference),
                                        ("--infinite-id-weights", args.infinite_id_weights),
                                        ("--image-encoder", args.image_encoder)) if not value]
    if missing:
        raise SystemExit(f"--method infinite-id needs {', '.join(missing)}")
    import time

    from infer.generate import analyzer_kwargs, check_paths_first

    check_paths_first(args, {"--out": args.out, "--save-text-stream": args.save_text_stream},
                      {"--reference": args.reference})

    import jax.numpy as jnp
    import numpy as np

    from dynamicid_jax.image_io import image_grid, save_png
    from dynamicid_jax.pipelines.infinite_id import InfiniteIDPipeline

    steps = DEFAULT_STEPS if getattr(args, "steps", None) is None else args.steps
    guidance = DEFAULT_GUIDANCE if getattr(args, "guidance_scale", None) is None else args.guidance_scale
    mix_steps = parse_mix_steps(args.mix_steps)
    kwargs = analyzer_kwargs(args)
    start = time.perf_counter()
    print(f"loading {args.model} + Infinite-ID …", file=sys.stderr, flush=True)
    pipe = InfiniteIDPipeline.from_pretrained(
        args.model, args.infinite_id_weights, args.image_encoder, face_analyzer=args.analyzer,
        analyzer_kwargs=kwargs, config=getattr(args, "config", None), scheduler=getattr(args, "scheduler", "ddim"),
        dtype=getattr(jnp, getattr(args, "dtype", "float32")), mix_layers=parse_mix_layers(args.mix_layers))
    print(f"loaded in {time.perf_counter() - start:.1f}s; sampling ({len(args.prompt)}×{args.height}×{args.width}, "
          f"{steps} steps, {len(args.reference)} reference(s)) …", file=sys.stderr, flush=True)
    out = pipe(args.prompt, references=args.reference, negative_prompt=args.negative_prompt, steps=steps,
               guidance_scale=guidance, seed=args.seed, height=args.height, width=args.width,
               id_scale=args.id_scale, adain=args.adain, mix_steps=mix_steps,
               return_text_stream=bool(args.save_text_stream))
    images, text_images = out if args.save_text_stream else (out, None)
    t = pipe.last_timings
    print(f"compile {t.get('compile_s', 0.0):.1f}s, sampling {t['run_s']:.2f}s", file=sys.stderr)

    def save(batch, path):
        save_png(batch[0] if len(batch) == 1 else image_grid(np.asarray(batch)), path)
        print(os.path.abspath(path))

    save(images, args.out)
    if text_images is not None:
        save(text_images, args.save_text_stream)
    return 0
