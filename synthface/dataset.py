"""Writing and reading a SynthFace tree.

Layout (``out`` = the dataset folder)::

    out/synthface.json                       generator settings, vocabularies, identity lists, scene list
    out/train/id00000/happy_left.png         35 images per identity: {expression}_{pose}.png
    out/train/id00000/happy_left.txt         caption (scene attributes: background, clothing, placement)
    out/train/id00000/happy_left.json        exact face values (see ``image_record``)
    out/heldout/ho00000/...                  identities never used in training, same layout
    out/scenes/scene00000.{png,txt,json}     2–3 held-out people side by side, boxes and identities known
    out/pairs/pair00000.{png,txt,json}       2 training people side by side (the base's prior of groups)

Every file depends only on ``(seed, split, index)`` — see :mod:`.world` — so two runs with the same seed write
byte-identical trees, and identity ``k`` is the same person whatever ``--identities`` is.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .render import render_group, render_portrait
from .world import (
    BACKGROUNDS,
    CLOTHING,
    EXPRESSIONS,
    GLASSES,
    HAIR_STYLES,
    PLACEMENT_PHRASE,
    PLACEMENTS,
    POSE_YAW,
    POSES,
    identity_name,
    image_name,
    rng_for,
    sample_identity,
    sample_scene,
    sample_variation,
)

__all__ = ["SCHEMA", "caption_for", "group_caption", "render_identity", "write_identity", "render_scene",
           "write_scene", "generate", "load_index", "list_images", "load_split", "load_pairs", "read_record"]

SCHEMA = "synthface/3"  # 2: close-up portraits, training pairs; 3: expressions drawn 1.8× stronger
_COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
_POSITION_WORDS = {2: ("left", "right"), 3: ("left", "middle", "right")}


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def caption_for(background: str, clothing: str, placement: str) -> str:
    """The caption of a single-person image: it names the three scene attributes."""
    return f"a photo of a person in {_a(clothing)} shirt {PLACEMENT_PHRASE[placement]}, {background} background"


def _write_text(path: str, text: str) -> None:
    """Atomic, without an fsync per file (a regenerable data set of thousands of small files)."""
    from dynamicid_jax.file_io import write_text

    write_text(text, path, durable=False)


def _write_json(path: str, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _save_png(path: str, image: np.ndarray) -> None:
    from dynamicid_jax.file_io import save_png

    save_png(image, path, durable=False)


def render_identity(seed: int, split: str, index: int, size: int = 64) -> list[tuple[str, np.ndarray, dict]]:
    """All 35 images of one identity → ``[(name, uint8 image, record), ...]`` in (expression, pose) order."""
    ident = sample_identity(seed, split, index)
    name = identity_name(split, index)
    out = []
    for k, (expression, pose) in enumerate((e, p) for e in EXPRESSIONS for p in POSES):
        rng = rng_for(seed, split, index, 1 + k)
        scene = sample_scene(rng)
        variation = sample_variation(rng)
        image, face = render_portrait(ident, expression, pose, scene, variation, size)
        stem = image_name(expression, pose)
        record = {
            "schema": SCHEMA, "split": split, "identity": name, "image": f"{stem}.png",
            "size": [size, size], **face,
            "caption": caption_for(scene.background, scene.clothing, scene.placement),
            "scene": scene.to_dict(), "identity_params": ident.to_dict(), "variation": variation.to_dict(),
        }
        out.append((stem, image, record))
    return out


def write_identity(out_dir: str, seed: int, split: str, index: int, size: int = 64) -> list[str]:
    """Render and write one identity's 35 images (+ captions and sidecars); returns the image paths."""
    folder = os.path.join(out_dir, split, identity_name(split, index))
    paths = []
    for stem, image, record in render_identity(seed, split, index, size):
        base = os.path.join(folder, stem)
        _save_png(base + ".png", image)
        _write_text(base + ".txt", record["caption"] + "\n")
        _write_json(base + ".json", record)
        paths.append(base + ".png")
    return paths


def group_caption(background: str, clothing: Sequence[str]) -> str:
    """The caption of a group image: each person's shirt by side, never who they are."""
    n = len(clothing)
    words = _POSITION_WORDS[n]
    parts = [f"the person {'in the middle' if w == 'middle' else 'on the ' + w} wears {_a(c)} shirt"
             for w, c in zip(words, clothing)]
    return f"a photo of {_COUNT_WORDS[n]} people side by side, {', '.join(parts)}, {background} background"


def render_scene(seed: int, scene_index: int, pool: list[tuple[str, int]], size: int = 64, *,
                 split: str = "scenes", people: int | None = None) -> tuple[np.ndarray, dict]:
    """A group image: ``people`` (default 2 or 3 at random) distinct people from ``pool`` (``(split, index)``
    pairs) side by side. ``split``: ``"scenes"`` (held-out evaluation scenes) or ``"pairs"`` (training pairs)."""
    rng = rng_for(seed, split, scene_index)
    if len(pool) < 2:
        raise ValueError(f"a scene needs at least 2 identities to choose from, got {len(pool)}")
    if people is None:
        n = 2 if len(pool) < 3 or rng.uniform() < 0.5 else 3
    else:
        n = int(people)
        if n < 2 or n > min(3, len(pool)):
            raise ValueError(f"people must be 2 or 3 and at most the pool size {len(pool)}, got {people!r}")
    chosen = [pool[int(i)] for i in rng.choice(len(pool), size=n, replace=False)]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    people_ = []
    for id_split, index in chosen:
        options = [c for c in CLOTHING if c != background]
        clothing = options[int(rng.integers(len(options)))]
        people_.append({"identity": sample_identity(seed, id_split, index), "split": id_split,
                        "name": identity_name(id_split, index), "expression": EXPRESSIONS[int(rng.integers(7))],
                        "pose_name": POSES[int(rng.integers(5))], "clothing": clothing,
                        "variation": sample_variation(rng)})
    group_var = sample_variation(rng)
    image, faces = render_group(people_, background, group_var, size)
    words = _POSITION_WORDS[n]
    caption = group_caption(background, [p["clothing"] for p in people_])
    for face, p, w in zip(faces, people_, words):
        face.update({"identity": p["name"], "split": p["split"], "clothing": p["clothing"], "position": w,
                     "reference": f"{p['split']}/{p['name']}/neutral_front.png",
                     "identity_params": p["identity"].to_dict()})
    stem = "scene" if split == "scenes" else "pair"
    record = {"schema": SCHEMA, "split": split, "image": f"{stem}{scene_index:05d}.png",
              "size": [int(image.shape[0]), int(image.shape[1])], "caption": caption, "background": background,
              "faces": faces}
    return image, record


def write_scene(out_dir: str, seed: int, scene_index: int, pool: list[tuple[str, int]], size: int = 64, *,
                split: str = "scenes", people: int | None = None) -> str:
    image, record = render_scene(seed, scene_index, pool, size, split=split, people=people)
    base = os.path.join(out_dir, split, os.path.splitext(record["image"])[0])
    _save_png(base + ".png", image)
    _write_text(base + ".txt", record["caption"] + "\n")
    _write_json(base + ".json", record)
    return base + ".png"


def _pair_job(args):
    out_dir, seed, k, pool, size = args
    return write_scene(out_dir, seed, k, pool, size, split="pairs", people=2)


def _identity_job(args):
    return write_identity(*args)


def _run_jobs(pool, fn, jobs: list, desc: str, unit: str, progress: bool) -> list:
    """``[fn(job) for job in jobs]`` in order, in ``pool``'s processes when there is one, with a progress bar."""
    if not jobs:
        return []
    from tqdm import tqdm

    results = pool.imap(fn, jobs, chunksize=2) if pool is not None else map(fn, jobs)
    return list(tqdm(results, total=len(jobs), desc=desc, unit=unit, disable=not progress))


def generate(out_dir: str, identities: int, seed: int = 0, size: int = 64, heldout: int | None = None,
             scenes: int | None = None, workers: int = 1, progress: bool = True, pairs: int = 0,
             validation: int = 0) -> dict[str, Any]:
    """Write a whole SynthFace tree (see the module docstring); returns the index it wrote.

    ``heldout`` defaults to max(2, identities // 10), ``scenes`` to 2 × heldout. ``pairs``: two-person images of
    training identities (``size × 2·size``, captions naming each person's shirt and side) — what stage 0 learns
    groups from. ``validation``: identities of a third split (``validation/va…``, their own seeds) that nothing
    trains on and the report never scores — the references for choosing a recipe without touching the held-out
    identities (``infer.eval --suite synthface --split validation``). ``workers`` > 1 renders identities and pairs
    in that many processes (the output does not depend on it).
    """
    if int(identities) < 1:
        raise ValueError(f"identities must be >= 1, got {identities!r}")
    if int(size) < 32 or int(size) % 8:
        raise ValueError(f"size must be a multiple of 8 and >= 32, got {size!r}")
    heldout = max(2, identities // 10) if heldout is None else int(heldout)
    scenes = 2 * heldout if scenes is None else int(scenes)
    if heldout < 0 or scenes < 0 or int(pairs) < 0 or int(validation) < 0:
        raise ValueError(f"heldout, scenes, pairs and validation must be >= 0, got {heldout}, {scenes}, {pairs}, "
                         f"{validation}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1 (rendering processes), got {workers!r}")
    if int(pairs) and identities < 2:
        raise ValueError(f"pairs need at least 2 training identities, got {identities}")
    jobs = [(out_dir, seed, "train", i, size) for i in range(identities)]
    jobs += [(out_dir, seed, "heldout", i, size) for i in range(heldout)]
    jobs += [(out_dir, seed, "validation", i, size) for i in range(int(validation))]
    os.makedirs(out_dir, exist_ok=True)
    pool_ids = [("heldout", i) for i in range(heldout)] if heldout >= 2 else [("train", i) for i in
                                                                             range(identities)]
    train_pool = [("train", i) for i in range(identities)]
    pair_jobs = [(out_dir, seed, k, train_pool, size) for k in range(int(pairs))]
    if workers > 1:
        import multiprocessing as mp

        # "spawn": safe even when the caller has started JAX's threads (forking those is not)
        processes = mp.get_context("spawn").Pool(int(workers))
    else:
        processes = contextlib.nullcontext()
    with processes as pool:
        _run_jobs(pool, _identity_job, jobs, "SynthFace identities", "id", progress)
        scene_files = []
        if scenes and len(pool_ids) >= 2:
            for k in range(scenes):
                scene_files.append(os.path.relpath(write_scene(out_dir, seed, k, pool_ids, size), out_dir))
        pair_files = [os.path.relpath(path, out_dir)
                      for path in _run_jobs(pool, _pair_job, pair_jobs, "SynthFace pairs", "img", progress)]
    index = {
        "schema": SCHEMA, "seed": int(seed), "image_size": int(size),
        "expressions": list(EXPRESSIONS), "poses": list(POSES), "pose_yaw": POSE_YAW,
        "backgrounds": list(BACKGROUNDS), "clothing": list(CLOTHING), "placements": list(PLACEMENTS),
        "hair_styles": list(HAIR_STYLES), "glasses": list(GLASSES), "num_landmarks": 68,
        "splits": {"train": [identity_name("train", i) for i in range(identities)],
                   "heldout": [identity_name("heldout", i) for i in range(heldout)],
                   **({"validation": [identity_name("validation", i) for i in range(int(validation))]}
                      if int(validation) else {})},
        "images_per_identity": len(EXPRESSIONS) * len(POSES),
        "scenes": scene_files,
        "pairs": pair_files,
    }
    _write_json(os.path.join(out_dir, "synthface.json"), index)
    return index


# --------------------------------------------------------------------------------------------------- reading

def load_index(out_dir: str) -> dict[str, Any]:
    path = os.path.join(out_dir, "synthface.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{out_dir!r} is not a SynthFace folder (no synthface.json); create one with "
                                "python -m synthface --out DIR --identities N")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_record(png_path: str) -> dict[str, Any]:
    """The sidecar JSON of a SynthFace image."""
    with open(os.path.splitext(png_path)[0] + ".json", encoding="utf-8") as f:
        return json.load(f)


def list_images(out_dir: str, split: str, identities: Iterable[str] | None = None) -> list[str]:
    """Image paths of a split (``"train"`` / ``"heldout"``), sorted by identity then file name."""
    index = load_index(out_dir)
    if split not in index["splits"]:
        raise ValueError(f"split must be one of {sorted(index['splits'])}, got {split!r}")
    names = index["splits"][split] if identities is None else list(identities)
    paths = []
    for name in names:
        folder = os.path.join(out_dir, split, name)
        paths += sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))
    return paths


def load_pairs(out_dir: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The training pairs as ``uint8 [M, H, 2H, 3]`` plus their records (empty arrays when the tree has none)."""
    from PIL import Image

    index = load_index(out_dir)
    paths = [os.path.join(out_dir, p) for p in index.get("pairs", [])]
    if not paths:
        size = int(index["image_size"])
        return np.zeros((0, size, 2 * size, 3), np.uint8), []
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return images, [read_record(p) for p in paths]


def load_split(out_dir: str, split: str, identities: Iterable[str] | None = None
               ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """All images of a split as ``uint8 [N, H, W, 3]`` plus their records (same order)."""
    from PIL import Image

    paths = list_images(out_dir, split, identities)
    if not paths:
        raise ValueError(f"no images in split {split!r} of {out_dir!r}")
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return images, [read_record(p) for p in paths]

