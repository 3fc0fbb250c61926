"""Stage 0's checks on its export (see :mod:`synthface.stage0`): the base draws from its own prompts, and the
world's background colours and scene classifier read what the prompts asked for."""
from __future__ import annotations

import os
import time
from typing import Mapping, Sequence

import numpy as np


def sample_prompts(count: int) -> tuple[list[str], list[dict]]:
    """``count`` captions cycling through the backgrounds (clothing and placement vary too) and their labels."""
    from synthface import BACKGROUNDS, CLOTHING, PLACEMENTS, caption_for

    bgs, cls = list(BACKGROUNDS), list(CLOTHING)
    prompts, labels = [], []
    for k in range(count):
        lab = {"background": bgs[k % len(bgs)], "clothing": cls[(3 * k + 1) % len(cls)],
               "placement": PLACEMENTS[(k // len(bgs) + k) % len(PLACEMENTS)]}
        prompts.append(caption_for(**lab))
        labels.append(lab)
    return prompts, labels


def background_palette_accuracy(images: np.ndarray, backgrounds: Sequence[str], border: int = 4) -> float:
    """Fraction of images whose top corners' mean colour is nearest (RGB) to the named background's palette colour
    (the person stands in the lower middle, so the top corners show the background)."""
    from synthface import BACKGROUNDS

    names = list(BACKGROUNDS)
    palette = np.array([BACKGROUNDS[n] for n in names], np.float32)
    hits = []
    for im, name in zip(np.asarray(images, np.float32) / 255.0, backgrounds):
        corners = np.concatenate([im[:border, :border].reshape(-1, 3), im[:border, -border:].reshape(-1, 3)])
        nearest = names[int(np.argmin(np.sum((palette - corners.mean(0)) ** 2, axis=1)))]
        hits.append(nearest == name)
    return float(np.mean(hits))


def check_export(folder: str, cfg: Mapping, out_png: str | None) -> dict:
    """Load the export with our loader, generate ``sample.count`` images from captions, score them."""
    from dynamicid_jax.file_io import image_grid, save_png
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion

    s = cfg["sample"]
    sd = StableDiffusion.from_pretrained(folder)
    res = int(cfg["data"]["resolution"])
    prompts, labels = sample_prompts(int(s["count"]))
    start = time.perf_counter()
    images = sd.generate(prompts, height=res, width=res, steps=int(s["steps"]),
                         guidance_scale=float(s["guidance_scale"]), seed=int(s["seed"]))
    out = {"count": len(prompts), "steps": int(s["steps"]), "guidance_scale": float(s["guidance_scale"]),
           "generate_s": time.perf_counter() - start, "prompts": prompts,
           "background_palette_accuracy": background_palette_accuracy(images, [l["background"] for l in labels])}
    if s.get("models"):
        from synthface.evaluation.classifiers import load_eval_models

        scene = load_eval_models(s["models"]).scene_classifier
        if scene is not None:
            heads = {h for h, _ in scene.config.heads}
            truth = {h: [l[h] for l in labels] for h in ("background", "clothing", "placement") if h in heads}
            out["scene_classifier_accuracy"] = scene.accuracy(images, truth)
    if out_png:
        save_png(image_grid(images, columns=min(len(images), 8)), out_png)
        out["grid"] = os.path.basename(out_png)
    return out
