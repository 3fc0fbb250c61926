"""Text-to-image and identity generation (DynamicID, Infinite-ID) from the command line.

    python -m infer.generate --model PATH --prompt "a photo of a cat" --out cat.png
    python -m infer.generate --model SD15 --dynamicid CONVERTED --image-encoder CLIP-H \\
        --reference alice.jpg --reference bob.jpg \\
        --prompt "two people in a bus" --boxes "0.1,0.1,0.5,0.4;0.1,0.6,0.5,0.9" --save-gates gates.png --out out.png
    python -m infer.generate --method infinite-id --model SD15 --infinite-id-weights IID --image-encoder CLIP-H \\
        --reference me.jpg --prompt "a man in oil painting style" --out me.png

``--dynamicid`` takes a folder written by ``python -m infer.convert`` (official ``SAA.bin`` etc. converted once) or
``python -m train.export_dynamicid``. ``--model`` may be SD1.x or SDXL for every method (read from the folder or
file); the method's weights must belong to the same backbone.
Methods: without ``--method``, ``--dynamicid`` selects DynamicID and plain text-to-image runs otherwise. Other
methods plug in as an :class:`IdentityMethod` (``add_arguments(parser)``, ``run(args)``; see :func:`identity_methods`);
``--steps`` / ``--guidance-scale`` left out take each method's defaults, ``--id-scale`` is shared.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, NamedTuple

TEXT_TO_IMAGE_STEPS = DYNAMICID_STEPS = 50
NO_EDIT = ("", "-")  # a --face-prompt / --target-landmark value meaning "nothing for this reference"
TEXT_TO_IMAGE_GUIDANCE = 7.5
DYNAMICID_GUIDANCE = 5.0  # the official DynamicID pipeline's default
INFINITE_ID_STEPS, INFINITE_ID_GUIDANCE = 30, 5.0
_DYNAMICID_ONLY = ("dynamicid", "face_prompt", "target_landmark", "boxes", "layout", "save_gates", "boost_steps",
                   "boost_strength", "mix", "no_gate", "strict_faces")
#: options every identity method shares (one name per concept), and the old spellings still accepted
_IDENTITY_SHARED = ("reference", "image_encoder", "analyzer", "analyzer_root", "id_scale")
DEPRECATED_ALIASES = {"--ref": "--reference", "--clip-vision": "--image-encoder", "--face-backend": "--analyzer",
                      "--face-root": "--analyzer-root"}


class IdentityMethod(NamedTuple):
    """A ``--method`` besides DynamicID: adds its options to the parser, then runs with the parsed arguments."""

    add_arguments: Callable[[argparse.ArgumentParser], Any]
    run: Callable[[argparse.Namespace], int]


def identity_methods() -> dict[str, IdentityMethod]:
    """Identity methods besides DynamicID (whose options are built in): ``--method`` name → its
    :class:`IdentityMethod`. Add a method by adding it here."""
    return {"infinite-id": IdentityMethod(add_infinite_id_arguments, run_infinite_id)}


def parse_boxes(text: str) -> list[list[float]]:
    """``"y0,x0,y1,x1;y0,x0,y1,x1"`` (normalised) → ``[[y0, x0, y1, x1], ...]``."""
    boxes = []
    for part in text.split(";"):
        values = [v.strip() for v in part.split(",")]
        try:
            box = [float(v) for v in values]
        except ValueError:
            box = []
        if len(box) != 4:
            raise argparse.ArgumentTypeError(f"--boxes: each box is 'y0,x0,y1,x1' (normalised, boxes separated by "
                                             f"';'), got {part!r}")
        boxes.append(box)
    return boxes


def parse_layout(text: str) -> str | list[float]:
    """``row`` | ``grid`` | relative widths ``w1,w2,...``."""
    if text in ("row", "grid"):
        return text
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layout must be 'row', 'grid' or relative widths like '2,1', got "
                                         f"{text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from dynamicid_jax.cli_args import add_deprecated_alias, finite_float, nonnegative_float, positive_int
    from dynamicid_jax.faces import available_backends

    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers SD1.x or SDXL folder, or single-file .safetensors "
                   "checkpoint (the backbone is read from the folder or file)")
    p.add_argument("--config", help="for single-file checkpoints: a diffusers folder holding the configs")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=positive_int, default=None, help="default: 512 (SD1.x), 1024 (SDXL)")
    p.add_argument("--width", type=positive_int, default=None, help="default: 512 (SD1.x), 1024 (SDXL)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="default: 50 (text-to-image, DynamicID), 30 (Infinite-ID)")
    p.add_argument("--guidance-scale", type=nonnegative_float, default=None,
                   help=f"default {TEXT_TO_IMAGE_GUIDANCE} (text-to-image), {DYNAMICID_GUIDANCE} (DynamicID, "
                        "Infinite-ID)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "dpm++2m", "euler"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (params stay fp32; scheduler math is fp32)")
    p.add_argument("--out", required=True, help="PNG path; a batch is saved as one grid")

    s = p.add_argument_group("identity (every identity method; old spellings --ref, --clip-vision, --face-backend, "
                             "--face-root still work, deprecated)")
    s.add_argument("--reference", action="append", metavar="IMAGE",
                   help="reference photo, one per identity (repeat); DynamicID places identities left → right in "
                        "this order unless --boxes says otherwise; Infinite-ID mixes several")
    s.add_argument("--image-encoder", metavar="PATH",
                   help="CLIPVisionModelWithProjection folder (CLIP-ViT-H-14 for SD1.5)")
    s.add_argument("--analyzer", default="insightface", choices=available_backends(),
                   help="face analysis backend (the official weights were trained with insightface, 512-d)")
    s.add_argument("--analyzer-root", metavar="DIR",
                   help="the backend's model folder (insightface: root holding models/buffalo_l/; dlib: folder of "
                        "the .dat models; a plug-in's: what it registered)")
    s.add_argument("--id-scale", type=finite_float, default=1.0,
                   help="weight of the identity branch (DynamicID; 0 = text only) or λ of the ID cross-attention "
                        "(Infinite-ID)")
    for old, new in DEPRECATED_ALIASES.items():
        add_deprecated_alias(p, old, new)

    methods = identity_methods()
    p.add_argument("--method", choices=["dynamicid", *methods], default=None,
                   help="identity method (default: dynamicid when --dynamicid is given, else plain text-to-image)")
    p.method_dests = {}  # method → the option dests it added (to reject them when another method runs)
    for name, method in methods.items():
        before = set(map(id, p._actions))
        method.add_arguments(p)
        p.method_dests[name] = {a.dest for a in p._actions if id(a) not in before}

    g = p.add_argument_group("DynamicID (identity personalisation; --id-scale weighs the identity branch)")
    g.add_argument("--dynamicid", metavar="PATH", help="converted DynamicID folder (python -m infer.convert)")
    g.add_argument("--face-prompt", action="append", metavar="TEXT",
                   help="IMR edit for the matching --reference, e.g. 'a very surprised expression, front view' "
                        "(repeat once per --reference; '-' = no edit)")
    g.add_argument("--target-landmark", action="append", metavar="PNG",
                   help="96×96 target landmark image for the matching --reference ('-' = reuse the "
                        "reference's)")
    g.add_argument("--boxes", type=parse_boxes, help="'y0,x0,y1,x1;...' normalised: one box per identity "
                   "(regional routing) or one box for several identities (identity mixing)")
    g.add_argument("--layout", type=parse_layout, default="row",
                   help="without --boxes: 'row' (equal vertical strips), 'grid', or relative widths 'w1,w2,...'")
    g.add_argument("--boost-steps", type=int, default=None, help="layout boost steps (default: 0 for one "
                   "identity without boxes, else 12)")
    g.add_argument("--boost-strength", type=nonnegative_float, default=None, help="layout boost s (default 2)")
    g.add_argument("--mix", type=finite_float, default=0.5, help="identity mixing weight of the first identity")
    g.add_argument("--no-gate", action="store_true", help="activate_query=False: no gate, routing or boost")
    g.add_argument("--strict-faces", action="store_true",
                   help="a reference with several faces is an error (default: use the largest, warn)")
    g.add_argument("--save-gates", metavar="FILE.png", help="also write where identity was injected (overlay)")
    return p


def _resolve_method(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Which method runs (``"text-to-image"``, ``"dynamicid"`` or another ``--method``); rejects options that
    belong to a method that does not run."""
    method = args.method or ("dynamicid" if args.dynamicid else "text-to-image")

    def given(dests):
        return [f"--{d.replace('_', '-')}" for d in sorted(dests) if getattr(args, d) != parser.get_default(d)]

    if method != "dynamicid":
        wrong = given(set(_DYNAMICID_ONLY))
        if wrong:
            parser.error(f"{', '.join(wrong)} belong to DynamicID (--dynamicid PATH)")
        if method == "text-to-image":
            wrong = given(set(_IDENTITY_SHARED))
            if wrong:
                parser.error(f"{', '.join(wrong)} need{'s' if len(wrong) == 1 else ''} an identity method "
                             f"(--dynamicid PATH or --method NAME)")
    for name, dests in parser.method_dests.items():
        wrong = given(dests - set(_IDENTITY_SHARED)) if name != method else []
        if wrong:
            parser.error(f"{', '.join(wrong)} belong to --method {name}")
    if method == "dynamicid":
        if not args.dynamicid:
            parser.error("--method dynamicid needs --dynamicid PATH (a folder from python -m infer.convert)")
        if not args.reference:
            parser.error("--dynamicid needs at least one --reference image")
        for flag in ("face_prompt", "target_landmark"):
            values = getattr(args, flag)
            if values is not None and len(values) != len(args.reference):
                parser.error(f"--{flag.replace('_', '-')} given {len(values)} time(s) for {len(args.reference)} "
                             f"--reference image(s); give one per --reference ('-' for none)")
    return method


def check_paths_first(args: argparse.Namespace, outputs: dict[str, str | None],
                      inputs: dict[str, list[str] | None]) -> None:
    """Before loading or sampling: every output location writable, every input image file present and readable."""
    from dynamicid_jax.file_io import check_readable, check_writable

    for flag, path in outputs.items():
        if path:
            check_writable(path, flag)
    for flag, paths in inputs.items():
        for path in paths or []:
            if path in NO_EDIT:
                continue
            check_readable(path, flag)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{flag} {path!r}: no such image file"
                                        + (" (it is a folder)" if os.path.isdir(path) else ""))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    method = _resolve_method(parser, args)
    _default_size(args, _is_sdxl_model(args.model))
    if method == "dynamicid":
        return run_dynamicid(args)
    if method == "text-to-image":
        return run_text_to_image(args)
    return identity_methods()[method].run(args)


def _default_size(args: argparse.Namespace, sdxl: bool) -> None:
    """``--height`` / ``--width`` left out: 1024 for SDXL, 512 for SD1.x (also for callers that skip main)."""
    for side in ("height", "width"):
        if getattr(args, side, None) is None:
            setattr(args, side, 1024 if sdxl else 512)


def _is_sdxl_model(path: str) -> bool:
    from dynamicid_jax.weights.keymap import is_sdxl

    return is_sdxl(path)


def save_images(images, path: str) -> str:
    """One image as it is, a batch as one grid, written atomically to ``path`` (PNG); the absolute path."""
    import numpy as np

    from dynamicid_jax.file_io import image_grid, save_png

    save_png(images[0] if len(images) == 1 else image_grid(np.asarray(images)), path)
    return os.path.abspath(path)


def run_text_to_image(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion

    check_paths_first(args, {"--out": args.out}, {})
    guidance = TEXT_TO_IMAGE_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    steps = TEXT_TO_IMAGE_STEPS if args.steps is None else args.steps
    start = time.perf_counter()
    print(f"loading {args.model} …", file=sys.stderr, flush=True)
    sdxl = _is_sdxl_model(args.model)
    _default_size(args, sdxl)
    if sdxl:
        from dynamicid_jax.pipelines.stable_diffusion_xl import StableDiffusionXL as pipeline_class
    else:
        pipeline_class = StableDiffusion
    sd = pipeline_class.from_pretrained(args.model, config=args.config, scheduler=args.scheduler,
                                        dtype=getattr(jnp, args.dtype))
    print(f"loaded in {time.perf_counter() - start:.1f}s; compiling the sampler "
          f"({len(args.prompt)}×{args.height}×{args.width}, {steps} steps) …", file=sys.stderr, flush=True)
    images = sd.generate(args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                         steps=steps, guidance_scale=guidance, seed=args.seed)
    t = sd.last_timings
    print(f"compile {t.get('compile_s', 0.0):.1f}s, sampling {t['run_s']:.2f}s "
          f"({steps / t['run_s']:.2f} it/s incl. text encoding and VAE decode)", file=sys.stderr)
    print(save_images(images, args.out))
    return 0


def analyzer_kwargs(args: argparse.Namespace) -> dict:
    """``--analyzer-root`` as ``get_analyzer``'s ``root``: each backend registered its own keyword for it."""
    return {"root": args.analyzer_root} if args.analyzer_root else {}


def run_dynamicid(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from dynamicid_jax.pipelines.dynamicid import DynamicIDPipeline
    from dynamicid_jax.pipelines.gates import save_gate_overlay

    def per_ref(values):
        return None if values is None else [None if v in NO_EDIT else v for v in values]

    check_paths_first(args, {"--out": args.out, "--save-gates": args.save_gates},
                      {"--reference": args.reference, "--target-landmark": args.target_landmark})
    guidance = DYNAMICID_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    steps = DYNAMICID_STEPS if args.steps is None else args.steps
    _default_size(args, _is_sdxl_model(args.model))
    start = time.perf_counter()
    print(f"loading {args.model} + DynamicID {args.dynamicid} (analyzer: {args.analyzer}) …", file=sys.stderr,
          flush=True)
    pipe = DynamicIDPipeline.from_pretrained(args.model, args.dynamicid, analyzer=args.analyzer,
                                             analyzer_kwargs=analyzer_kwargs(args),
                                             clip_vision_path=args.image_encoder,
                                             dtype=getattr(jnp, args.dtype), scheduler=args.scheduler,
                                             config=args.config, strict=args.strict_faces)
    n = len(args.reference)
    print(f"loaded in {time.perf_counter() - start:.1f}s; {n} identit{'y' if n == 1 else 'ies'}"
          f", {steps} steps at {args.height}×{args.width} …", file=sys.stderr, flush=True)
    result = pipe(args.prompt, args.reference, face_prompts=per_ref(args.face_prompt),
                  target_landmarks=per_ref(args.target_landmark), boxes=args.boxes, layout=args.layout,
                  negative_prompt=args.negative_prompt, steps=steps, guidance_scale=guidance, seed=args.seed,
                  height=args.height, width=args.width, id_scale=args.id_scale, boost_steps=args.boost_steps,
                  boost_strength=args.boost_strength, mix=args.mix, activate_query=not args.no_gate,
                  return_gates=bool(args.save_gates))
    images, gates = result if args.save_gates else (result, None)
    t = pipe.last_timings
    print(f"identities {t['encode_s']:.1f}s, compile {t.get('compile_s', 0.0):.1f}s, sampling {t['run_s']:.2f}s "
          f"({steps / t['run_s']:.2f} it/s incl. text encoding and VAE decode)", file=sys.stderr)
    out = save_images(images, args.out)
    if gates is not None:
        save_gate_overlay(gates, images[0], args.save_gates)
        print(os.path.abspath(args.save_gates), file=sys.stderr)
    print(out)
    return 0


# ---------------------------------------------------------------------------------------------------------
# --method infinite-id
# ---------------------------------------------------------------------------------------------------------
def add_infinite_id_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``--method infinite-id`` options (none required, so the other methods keep working)."""
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


def run_infinite_id(args: argparse.Namespace) -> int:
    """``--method infinite-id``: the generate options, the shared identity options and Infinite-ID's own;
    ``--steps`` / ``--guidance-scale`` left out take :data:`INFINITE_ID_STEPS` / :data:`INFINITE_ID_GUIDANCE`."""
    missing = [flag for flag, value in (("--reference", args.reference),
                                        ("--infinite-id-weights", args.infinite_id_weights),
                                        ("--image-encoder", args.image_encoder)) if not value]
    if missing:
        raise SystemExit(f"--method infinite-id needs {', '.join(missing)}")
    check_paths_first(args, {"--out": args.out, "--save-text-stream": args.save_text_stream},
                      {"--reference": args.reference})

    import jax.numpy as jnp

    from dynamicid_jax.pipelines.infinite_id import InfiniteIDPipeline

    steps = INFINITE_ID_STEPS if args.steps is None else args.steps
    guidance = INFINITE_ID_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    mix_steps = parse_mix_steps(args.mix_steps)
    kwargs = analyzer_kwargs(args)
    start = time.perf_counter()
    print(f"loading {args.model} + Infinite-ID …", file=sys.stderr, flush=True)
    pipe = InfiniteIDPipeline.from_pretrained(
        args.model, args.infinite_id_weights, args.image_encoder, face_analyzer=args.analyzer,
        analyzer_kwargs=kwargs, config=args.config, scheduler=args.scheduler, dtype=getattr(jnp, args.dtype),
        mix_layers=parse_mix_layers(args.mix_layers))
    print(f"loaded in {time.perf_counter() - start:.1f}s; sampling ({len(args.prompt)}×{args.height}×{args.width}, "
          f"{steps} steps, {len(args.reference)} reference(s)) …", file=sys.stderr, flush=True)
    out = pipe(args.prompt, references=args.reference, negative_prompt=args.negative_prompt, steps=steps,
               guidance_scale=guidance, seed=args.seed, height=args.height, width=args.width,
               id_scale=args.id_scale, adain=args.adain, mix_steps=mix_steps,
               return_text_stream=bool(args.save_text_stream))
    images, text_images = out if args.save_text_stream else (out, None)
    t = pipe.last_timings
    print(f"compile {t.get('compile_s', 0.0):.1f}s, sampling {t['run_s']:.2f}s", file=sys.stderr)
    print(save_images(images, args.out))
    if text_images is not None:
        print(save_images(text_images, args.save_text_stream))
    return 0


if __name__ == "__main__":
    from dynamicid_jax.errors import run_cli

    raise SystemExit(run_cli(main))
