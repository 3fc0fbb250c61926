"""The shipped SynthFace base: ``make base`` trains it, ``make demo`` starts from it.

    python -m synthface.demo_base [--out assets/synthface_base] [--work demo_out/base_work]

Stage 0 (:mod:`synthface.stage0` with ``train/configs/synthface_base.yaml``) trained long enough to draw recognisable
faces, on SynthFace's close-up portraits and two-person pairs of the training identities (captions name each
person's shirt and side, never who they are), so the base has a prior of faces and of groups as SD1.5 has. The
result is a diffusers folder with fp16 weights, small enough for git: the rows of the text encoder's token
embedding that no SynthFace text ever uses are zero (the SD1.5 tokenizer keeps working; git's compression removes
the zeros). ``provenance.json`` beside it records the command, seed, commit, the world and a fingerprint of its
training pixels, steps, losses, measured seconds and the SHA-256 of every file; :func:`verify_base` checks it.
See docs/demo.md.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["WORLD", "ASSET_DIR", "BASE_CONFIG", "build_base", "export_base", "verify_base", "world_fingerprint",
           "base_world_match", "pixel_fingerprint", "world_texts", "used_token_ids", "BaseAssetError",
           "BASE_COMMANDS"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the committed base
ASSET_DIR = os.path.join(REPO_ROOT, "assets", "synthface_base")
BASE_CONFIG = os.path.join(REPO_ROOT, "train", "configs", "synthface_base.yaml")
PROVENANCE = "provenance.json"
PROVENANCE_FORMAT = "dynamicid-jax/synthface-base-provenance-v1"
#: the commands a provenance may record as its builder: this module's, and its name before the world moved into
#: the ``synthface`` package (``infer.demo_base``; the shipped base was built under it, and its provenance — hashed
#: with the weights — keeps saying so)
BASE_COMMANDS = ("python -m synthface.demo_base", "python -m infer.demo_base")

#: The SynthFace world of the base and of the demo (one place: the demo generates the same portraits; only the
#: base needs the pairs).
WORLD: dict[str, int] = {"identities": 60, "heldout": 16, "scenes": 16, "pairs": 1200, "size": 64, "seed": 0}
#: processes that render the world (``make base``, ``make demo``); the files do not depend on it
#: (tests/test_synthface.py)
WORLD_WORKERS = 2


class BaseAssetError(RuntimeError):
    """The shipped base is missing, altered, or was trained on another world."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ fingerprints
def world_fingerprint(index: Mapping[str, Any]) -> str:
    """What decides the base's portraits: schema, seed, image size, the expression strength and the training and
    held-out identity lists (pairs and validation identities left out, so a demo world without pairs or with
    validation identities matches the base it trained on)."""
    from synthface.face_model import EXPRESSION_STRENGTH
    from synthface.render import HEAD_CENTRE_Y, HEAD_SCALE

    blob = {k: index.get(k) for k in ("schema", "seed", "image_size")}
    # the base never sees validation identities: a world that also has them is the same world to the base
    blob["splits"] = {k: v for k, v in (index.get("splits") or {}).items() if k in ("train", "heldout")}
    blob["render"] = [HEAD_SCALE, HEAD_CENTRE_Y] + ([] if EXPRESSION_STRENGTH == 1.0 else [EXPRESSION_STRENGTH])
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def pixel_fingerprint(images: Iterable[np.ndarray]) -> str:
    """SHA-256 over the decoded pixels (robust to PNG encoder versions, sensitive to any rendering change)."""
    h = hashlib.sha256()
    for im in images:
        a = np.ascontiguousarray(np.asarray(im, np.uint8))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _file_hashes(folder: str) -> dict[str, str]:
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if rel == PROVENANCE:
                continue
            with open(path, "rb") as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


# ----------------------------------------------------------------------------------------- the text vocabulary
def world_texts(data_root: str) -> list[str]:
    """Every text the SynthFace world can put in front of the base: each record's caption, face prompt and grid
    prompt (portraits, pairs, scenes), every single-person caption combination, the group captions' words, the
    stage-2 prompts, and the empty prompt."""
    import synthface
    from synthface.dataset import group_caption
    from synthface.world import (BACKGROUNDS, CLOTHING, EXPRESSIONS, PLACEMENTS, POSE_YAW, POSES,
                                                PROMPT_EXPRESSION, grid_prompt)
    from dynamicid_jax.faces import auto_face_prompt

    texts = {""}
    for b in BACKGROUNDS:
        for c in CLOTHING:
            for p in PLACEMENTS:
                texts.add(synthface.caption_for(b, c, p))
            texts.add(group_caption(b, [c, c]))
            texts.add(group_caption(b, [c, c, c]))
    for e in EXPRESSIONS:
        for p in POSES:
            texts.add(grid_prompt(e, p))
    for e in EXPRESSIONS:
        for yaw in sorted(set(POSE_YAW.values())):
            texts.add(auto_face_prompt((0.0, yaw, 0.0), PROMPT_EXPRESSION[e]))
    index = synthface.load_index(data_root)
    for split in ("train", "heldout"):
        for path in synthface.list_images(data_root, split):
            r = synthface.read_record(path)
            texts.update((r["caption"], r["face_prompt"], r["grid_prompt"]))
    for rel in [*index.get("pairs", []), *index.get("scenes", [])]:
        texts.add(synthface.read_record(os.path.join(data_root, rel))["caption"])
    return sorted(texts)


def used_token_ids(tokenizer, texts: Iterable[str]) -> np.ndarray:
    """Sorted token ids of ``texts`` (padding and the special tokens included)."""
    from dynamicid_jax.tokenizer import tokenize

    texts = list(texts)
    ids = set()
    for k in range(0, len(texts), 512):
        ids.update(np.unique(np.asarray(tokenize(tokenizer, texts[k:k + 512]))).tolist())
    return np.asarray(sorted(ids), np.int64)


# ------------------------------------------------------------------------------------------------- export
def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return {"commit": head, "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def _is_ours(folder: str) -> bool:
    try:
        with open(os.path.join(folder, PROVENANCE), encoding="utf-8") as f:
            return json.load(f).get("format") == PROVENANCE_FORMAT
    except (OSError, ValueError):
        return False


def export_base(sd_folder: str, out: str, *, data_root: str, stage0_metrics: Mapping[str, Any],
                command: str, extra: Mapping[str, Any] | None = None,
                world: Mapping[str, int] | None = None) -> str:
    """Write the fp16 base folder ``out`` from stage 0's export ``sd_folder`` (unused embedding rows zeroed) with its
    provenance. An existing ``out`` is replaced only when it is a base this module wrote."""
    import jax

    import synthface
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion

    out = os.path.abspath(out)
    if os.path.exists(out) and not _is_ours(out):
        raise FileExistsError(f"{out} exists and is not a SynthFace base written by synthface.demo_base "
                              f"(no {PROVENANCE}); choose another --out")
    sd = StableDiffusion.from_pretrained(sd_folder)
    keep = used_token_ids(sd.tokenizer, world_texts(data_root))
    params = jax.tree_util.tree_map(np.asarray, dict(sd.params))
    text = params["text_encoder"]
    path = _find_token_embedding(text)
    table = np.asarray(_get(text, path))
    mask = np.zeros((table.shape[0], 1), np.float32)
    mask[keep] = 1.0
    _set(text, path, table * mask)
    sd.params = {**sd.params, "text_encoder": text}
    from dynamicid_jax.file_io import atomic_folder, write_json

    with atomic_folder(out, replace=os.path.exists(out)) as staging:
        folder = sd.save_pretrained(os.path.join(staging, "base"), dtype="float16")
        for name in os.listdir(folder):
            os.replace(os.path.join(folder, name), os.path.join(staging, name))
        os.rmdir(folder)
        folder = staging
        index = synthface.load_index(data_root)
        train_images, _ = synthface.load_split(data_root, "train")
        pair_images, _ = synthface.load_pairs(data_root)
        d, v = stage0_metrics.get("diffusion", {}), stage0_metrics.get("vae", {})
        provenance = {
            "format": PROVENANCE_FORMAT,
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": command, **_git_commit(),
            "config": os.path.relpath(BASE_CONFIG, REPO_ROOT),
            "seed": int(stage0_metrics.get("config", {}).get("seed", 0)),
            "world": {"settings": dict(world or WORLD), "fingerprint": world_fingerprint(index),
                      "schema": index.get("schema"), "train_images": int(len(train_images)),
                      "train_pairs": int(len(pair_images)),
                      "pixels_sha256": pixel_fingerprint([*train_images, *pair_images])},
            "vae": {"steps": v.get("steps"), "loss_first": v.get("loss_first"), "loss_last": v.get("loss_last"),
                    "psnr_heldout": v.get("psnr_heldout"), "scaling_factor": v.get("scaling_factor"),
                    "wall_s": v.get("wall_s")},
            "diffusion": {"steps": d.get("steps"), "loss_first": d.get("loss_first"),
                          "loss_last": d.get("loss_last"), "loss_tail_mean": d.get("loss_tail_mean"),
                          "wall_s": d.get("wall_s"), "losses": d.get("losses")},
            "samples": {k: stage0_metrics.get("samples", {}).get(k)
                        for k in ("background_palette_accuracy", "count", "steps")},
            "params": stage0_metrics.get("params"),
            "text_vocabulary": {"kept_rows": int(len(keep)), "rows": int(table.shape[0])},
            "weights_dtype": "float16",
            "software": {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__},
            # training is bit for bit repeatable on one kind of CPU, not across kinds (XLA's CPU code differs)
            "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "arch": platform.machine()},
            **dict(extra or {}),
            "files": _file_hashes(folder),
        }
        write_json(provenance, os.path.join(folder, PROVENANCE), indent=1, sort_keys=True)
    return out


def _find_token_embedding(tree: Mapping) -> tuple[str, ...]:
    from flax import traverse_util

    for path in traverse_util.flatten_dict(dict(tree)):
        if "token_embedding" in path and path[-1] == "embedding":
            return path
    raise KeyError("the text encoder has no token_embedding/embedding parameter")


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


# ------------------------------------------------------------------------------------------------- checking
def verify_base(folder: str = ASSET_DIR) -> dict[str, Any]:
    """Check ``folder`` against its provenance (every file present with its recorded SHA-256, nothing extra);
    returns the provenance. Raises :class:`BaseAssetError` naming the first problem."""
    prov_path = os.path.join(folder, PROVENANCE)
    if not os.path.isfile(prov_path):
        raise BaseAssetError(f"{folder} holds no {PROVENANCE}: not a SynthFace base (make base writes one)")
    with open(prov_path, encoding="utf-8") as f:
        provenance = json.load(f)
    if provenance.get("format") != PROVENANCE_FORMAT:
        raise BaseAssetError(f"{prov_path}: format {provenance.get('format')!r}, expected {PROVENANCE_FORMAT!r}")
    recorded, actual = provenance.get("files", {}), _file_hashes(folder)
    for rel, digest in sorted(recorded.items()):
        if rel not in actual:
            raise BaseAssetError(f"{folder}: {rel} is missing (recorded in {PROVENANCE})")
        if actual[rel] != digest:
            raise BaseAssetError(f"{folder}: {rel} differs from its recorded SHA-256 (sha256 {actual[rel][:12]}… "
                                 f"!= {digest[:12]}…); rebuild with make base")
    extra = sorted(set(actual) - set(recorded))
    if extra:
        raise BaseAssetError(f"{folder}: files not in {PROVENANCE}: {extra}")
    return provenance


def check_world(provenance: Mapping[str, Any], data_root: str) -> dict[str, Any]:
    """The demo's world (rendered in ``data_root``) against the base's: :func:`base_world_match`."""
    import synthface

    return base_world_match(provenance, synthface.load_index(data_root), data_root)


def base_world_match(provenance: Mapping[str, Any], index: Mapping[str, Any], where: str = "the demo's world"
                     ) -> dict[str, Any]:
    """The base's world must be the demo's: the same schema, seed, size, renderer and held-out identities, and the
    base's training identities the first ones of the demo's (else :class:`BaseAssetError`). The demo may render
    more training identities than the base saw — identity ``i`` of a split is drawn from its own seed, so the first
    ones are the base's portraits — for the stages that learn identities (the face models and stage 1), the way
    SD1.5 never saw the people a user trains on. Returns the fingerprint and the count of extra identities."""
    want = provenance["world"]["fingerprint"]
    base_count = int(provenance["world"]["settings"]["identities"])
    train = list((index.get("splits") or {}).get("train", []))
    shared = {**index, "splits": {**index["splits"], "train": train[:base_count]}}
    got = world_fingerprint(shared)
    if len(train) < base_count or want != got:
        raise BaseAssetError(f"the SynthFace world in {where} (fingerprint {world_fingerprint(index)}, "
                             f"{len(train)} training identities) is not the one the shipped base was trained on "
                             f"({want}, {base_count} identities); run make demo-full to train a base for it")
    return {"world_fingerprint": got, "extra_train_identities": len(train) - base_count}


# ------------------------------------------------------------------------------------------------- the build
def build_base(out: str = ASSET_DIR, work: str = os.path.join("demo_out", "base_work"), *, progress: bool = True,
               overrides: Iterable[str] = (), quick: bool = False, command: str | None = None) -> str:
    """Generate the world (reused when present), train stage 0 on it (resumed when interrupted), export the fp16
    base to ``out`` with its provenance; returns ``out``."""
    import synthface
    from synthface import stage0

    data = os.path.join(work, "synthface")
    start = time.perf_counter()
    world = dict(WORLD)
    if quick:
        world.update(identities=4, heldout=2, scenes=2, pairs=8)
    if not _world_present(data, world):
        _log(f"base: SynthFace world → {data}")
        synthface.generate(data, world["identities"], seed=world["seed"], size=world["size"],
                           heldout=world["heldout"], scenes=world["scenes"], pairs=world["pairs"],
                           workers=1 if quick else WORLD_WORKERS,
                           progress=progress)
    world_s = time.perf_counter() - start
    sd_folder = stage0.run(BASE_CONFIG, [f"data.root={data}", f"progress_bar={str(progress).lower()}",
                                         *overrides], workdir=os.path.join(work, "stage0"), quick=quick)
    with open(os.path.join(os.path.dirname(sd_folder), "stage0_metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    command = command or "make base"
    out = export_base(sd_folder, out, data_root=data, stage0_metrics=metrics, command=command, world=world,
                      extra={"world_s": world_s, "overrides": list(overrides), "quick": bool(quick),
                             "wall_s_this_run": time.perf_counter() - start})
    _log(f"base: {out} ({_folder_mb(out):.1f} MB)")
    return out


def _world_present(data: str, world: Mapping[str, int]) -> bool:
    import synthface

    try:
        index = synthface.load_index(data)
    except FileNotFoundError:
        return False
    return (index.get("schema") == synthface.SCHEMA and index.get("seed") == world["seed"]
            and index.get("image_size") == world["size"]
            and len(index["splits"]["train"]) == world["identities"]
            and len(index["splits"]["heldout"]) == world["heldout"]
            and len(index.get("scenes", [])) == world["scenes"] and len(index.get("pairs", [])) == world["pairs"])


def _folder_mb(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs) / 2 ** 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m synthface.demo_base", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=ASSET_DIR, help="the base folder to write (default: the shipped asset)")
    p.add_argument("--work", default=os.path.join("demo_out", "base_work"),
                   help="world and stage-0 checkpoints (reused and resumed)")
    p.add_argument("--quick", action="store_true", help="a tiny world and a few steps (checks the wiring)")
    p.add_argument("--verify", action="store_true", help="only check --out against its provenance")
    p.add_argument("overrides", nargs="*", help="stage-0 config overrides (key.sub=value)")
    args = p.parse_args(argv)
    if args.verify:
        try:
            prov = verify_base(args.out)
        except BaseAssetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{args.out}: {len(prov['files'])} files match {PROVENANCE} (commit {prov.get('commit')})")
        return 0
    command = "python -m synthface.demo_base " + " ".join(argv if argv is not None else sys.argv[1:])
    build_base(args.out, args.work, overrides=args.overrides, quick=args.quick, command=command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
