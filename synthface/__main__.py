"""``python -m synthface --out DIR --identities N --seed S [--size 64] [--heldout H] [--validation V] [--scenes K]``

Writes a SynthFace tree (see ``synthface.dataset``). ``--train-models MODELS`` then trains the
world's face models into MODELS (``synthface.train_models``); ``--shards SHARDS`` turns the
training split into face-record shards through the ``synthetic`` analyzer (needs the models: ``--models`` or
``--train-models``).
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

from .dataset import generate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m synthface", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--identities", type=int, required=True, help="training identities (35 images each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 8, >= 32)")
    p.add_argument("--heldout", type=int, default=None, help="held-out identities (default max(2, N // 10))")
    p.add_argument("--validation", type=int, default=0,
                   help="validation identities: never trained on, never reported — the references for choosing a "
                        "recipe (infer.eval --suite synthface --split validation)")
    p.add_argument("--scenes", type=int, default=None, help="multi-person scenes (default 2 × heldout)")
    p.add_argument("--pairs", type=int, default=0,
                   help="two-person images of training identities (what stage 0 learns groups from)")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="rendering processes (the output does not depend on it)")
    p.add_argument("--train-models", metavar="MODELS", default=None,
                   help="after generating, train the SynthFace face models into this folder")
    p.add_argument("--models", default=None, help="existing face-model folder (for --shards)")
    p.add_argument("--shards", metavar="SHARDS", default=None,
                   help="after generating, build face-record shards of the train split into this folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    index = generate(args.out, args.identities, seed=args.seed, size=args.size, heldout=args.heldout,
                     scenes=args.scenes, pairs=args.pairs, workers=args.workers, progress=not args.quiet,
                     validation=args.validation)
    counts = [len(index["splits"].get(k, [])) for k in ("train", "heldout", "validation")]
    n_img = sum(counts) * index["images_per_identity"]
    print(f"SynthFace: {n_img} images of {counts[0]} training + {counts[1]} held-out + {counts[2]} validation "
          f"identities, {len(index['scenes'])} scenes and {len(index['pairs'])} pairs written to {args.out} in {time.time() - t0:.1f} s")
    models = args.models
    if args.train_models:
        from .train_models import train_all

        train_all(args.out, args.train_models, progress=not args.quiet)
        models = args.train_models
    if args.shards:
        if models is None:
            raise SystemExit("--shards needs the face models: pass --models DIR or --train-models DIR")
        from data_pipelines.build_shards import build_shards

        build_shards(os.path.join(args.out, "train"), args.shards, "synthetic",
                     analyzer_kwargs={"models_dir": models}, resolution=args.size, progress=not args.quiet)
    return index


if __name__ == "__main__":
    from dynamicid_jax.errors import run_cli

    raise SystemExit(run_cli(main))
