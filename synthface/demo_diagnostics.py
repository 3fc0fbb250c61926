"""Diagnostics of the demo's trained pieces: what the stage-1 ID tokens carry, and whether the IMR's edits differ.

Two questions decide whether expression editing can work at all (docs/demo.md): do the ID tokens of one identity
change with its expression (else the IMR has nothing to reconfigure), and do the IMR's edits towards different
expressions move the tokens in different directions (else the seven edits look alike)?

* :func:`token_variance_shares` — over the stage-2 token cache (one token set per training image): the share of the
  total variance that lies between identities, and of the within-identity variance the share explained by the
  expression, the pose and the background colour (sum of squared group means of the within-identity residuals).
* :func:`edit_shift_similarity` — one reference edited towards each of the seven expressions: the mean pairwise
  cosine of the token shifts (1.0: one shift whatever is asked) and their norms; and what the IMR is told: how far
  apart the base's pooled text embeddings of the seven face prompts lie (:func:`pooled_text_spread`), against the
  same prompt with one clothing colour swapped for another, a word the base has learnt to draw.
* :func:`denoiser_expression_retention` — a third question, about the base itself: can its UNet keep an expression
  it is shown? Real front views of every expression are encoded, noised to a few timesteps ``t``, and denoised in
  one step (the UNet's estimate of the clean latent, with the image's caption and its expression named in the
  prompt); the expression classifier reads the decoded estimates. If even a lightly noised face loses its
  expression, no identity tokens on top of this base can draw one.
* :func:`reference_expression_transfer` — the link between the two: does DynamicID, without any edit, draw the
  expression of the reference it is given? Front views of every expression of a few identities are the references;
  the classifier reads the generated faces. This is the most an IMR edit can reach with these tokens and this UNet:
  an edit only moves the tokens towards those of an image with the asked expression.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["token_variance_shares", "edit_shift_similarity", "pooled_text_spread", "expression_face_prompts",
           "denoiser_expression_retention", "reference_expression_transfer"]

#: the yardstick of :func:`pooled_text_spread`: one prompt, seven clothing colours of the world
COLOUR_PROMPTS = tuple(f"a photo of a person in a {c} shirt" for c in
                       ("red", "orange", "yellow", "green", "blue", "purple", "white"))


def expression_face_prompts() -> list[str]:
    """The automatic face prompt of a front view in each of the world's seven expressions (what an IMR edit asks
    for), in the order of ``synthface.world.EXPRESSIONS``."""
    from dynamicid_jax.faces import auto_face_prompt
    from synthface.world import EXPRESSIONS, PROMPT_EXPRESSION

    return [auto_face_prompt((0.0, 0.0, 0.0), PROMPT_EXPRESSION[e]) for e in EXPRESSIONS]


def token_variance_shares(token_cache: str, shards: str) -> dict[str, float]:
    from data_pipelines.shards import open_shards
    from train.token_cache import TokenCache

    cache, data = TokenCache.load(token_cache), open_shards(shards)
    n = min(len(data), len(cache.present))
    keep = [i for i in range(n) if cache.present[i]]
    records = [data.record(i) for i in keep]
    x = cache.tokens[keep].reshape(len(keep), -1).astype(np.float64)
    identity = np.array([r.key.split("/")[0] for r in records])
    stems = [os.path.splitext(r.key.split("/")[-1])[0] for r in records]
    labels = {"expression": np.array([s.split("_")[0] for s in stems]),
              "pose": np.array([s.split("_")[-1] for s in stems]),
              "background": np.array([r.caption.rsplit(", ", 1)[-1] for r in records])}

    def sum_sq(a):
        return float(((a - a.mean(0)) ** 2).sum())

    total = sum_sq(x)
    means = {i: x[identity == i].mean(0) for i in np.unique(identity)}
    resid = x - np.stack([means[i] for i in identity])
    within = float((resid ** 2).sum())
    out = {"records": len(keep), "between_identity": 1.0 - within / total if total else 0.0}
    for name, lab in labels.items():
        explained = sum((lab == v).sum() * float((resid[lab == v].mean(0) ** 2).sum()) for v in np.unique(lab))
        out[f"within_{name}"] = explained / within if within else 0.0
    return out


def edit_shift_similarity(pipe, reference: np.ndarray, face_prompts: list[str]) -> dict[str, Any]:
    """``pipe``: a DynamicIDPipeline with an IMR; ``reference``: one identity's image."""
    base = np.asarray(pipe.encode_identities([reference]))[0].reshape(-1)
    shifts = np.stack([np.asarray(pipe.encode_identities([reference], [p]))[0].reshape(-1) - base
                       for p in face_prompts])
    norms = np.linalg.norm(shifts, axis=1)
    unit = shifts / np.maximum(norms[:, None], 1e-12)
    cos = unit @ unit.T
    off = cos[~np.eye(len(face_prompts), dtype=bool)]
    return {"mean_pairwise_cosine": float(off.mean()), "min_pairwise_cosine": float(off.min()),
            "shift_norm_mean": float(norms.mean()), "token_norm": float(np.linalg.norm(base)),
            "prompts": list(face_prompts), "text_spread": pooled_text_spread(pipe.sd, face_prompts),
            "colour_text_spread": pooled_text_spread(pipe.sd, COLOUR_PROMPTS)}


def pooled_text_spread(sd, prompts) -> float:
    """Mean pairwise distance between the pooled text embeddings of ``prompts`` (the IMR's text input), relative to
    their mean norm: 0 when the base's text encoder gives every prompt the same vector. ``sd``: the base pipeline."""
    prompts = list(prompts)
    if len(prompts) < 2:
        raise ValueError(f"prompts must hold at least two texts to compare, got {len(prompts)}")
    pooled = np.asarray(sd.pooled_text(sd.params, sd.pooled_text_ids(prompts)), np.float64).reshape(len(prompts), -1)
    dist = np.linalg.norm(pooled[:, None] - pooled[None], axis=-1)[~np.eye(len(prompts), dtype=bool)]
    return float(dist.mean() / np.linalg.norm(pooled, axis=1).mean())


def denoiser_expression_retention(sd_path: str, models_dir: str, data: str, *, split: str = "heldout",
                                  timesteps: tuple[int, ...] = (50, 150, 300, 500), seed: int = 0) -> dict[str, Any]:
    """Expression accuracy of the base's one-step clean-latent estimates from real front views of ``split``
    noised to each of ``timesteps`` (see the module docstring), beside the same images after the VAE round trip
    alone: ``{"images", "round_trip", "one_step": {t: accuracy}}``."""
    import jax
    import jax.numpy as jnp

    from dynamicid_jax.models.vae import decode_latents, encode_to_latents
    from dynamicid_jax.pipelines.sampling import to_uint8
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion
    from synthface import dataset as sf_data
    from synthface.evaluation.scorer import SynthFaceScorer

    sd = StableDiffusion.from_pretrained(sd_path, scheduler="ddim")
    scheduler = sd.scheduler  # its forward process: add_noise / predicted_original at training timesteps
    scorer = SynthFaceScorer.from_models_dir(models_dir)
    images, records = sf_data.load_split(data, split)
    front = [i for i, r in enumerate(records) if r["pose_name"] == "front"]
    images, records = images[front], [records[i] for i in front]
    truth = [r["expression"] for r in records]
    prompts = [f"{r['caption']}, {r['grid_prompt']}" for r in records]

    def accuracy(ims: np.ndarray) -> float:
        return float(np.mean([p == t for p, t in zip(expression_labels(scorer, ims), truth)]))

    vae, vae_params = sd.vae, sd.params["vae"]
    latents = encode_to_latents(vae, vae_params, jnp.asarray(images), None)
    context = sd.encode_prompts(prompts)
    unet = jax.jit(lambda z, t: sd.unet.apply({"params": sd.params["unet"]}, z, t, context))
    out: dict[str, Any] = {"images": len(images), "split": split,
                           "round_trip": accuracy(np.asarray(to_uint8(decode_latents(vae, vae_params, latents)))),
                           "one_step": {}}
    for t in timesteps:
        steps = jnp.full((len(images),), t, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), t), latents.shape, latents.dtype)
        noisy = scheduler.add_noise(latents, noise, steps)
        clean = scheduler.predicted_original(unet(noisy, steps), noisy, steps)
        out["one_step"][str(t)] = accuracy(np.asarray(to_uint8(decode_latents(vae, vae_params, clean))))
    return out


def expression_labels(scorer, images) -> list[str]:
    """The expression classifier's label of each image's face (its top detection; the whole image when none)."""
    images = list(images)
    found = scorer.detect(images)
    boxes = np.array([d.boxes[int(np.argmax(d.scores))] if len(d) else (0, 0, im.shape[1], im.shape[0])
                      for d, im in zip(found, images)], np.float64)
    return list(scorer.face_labels(images, boxes)["expression"])


def reference_expression_transfer(pipe, models_dir: str, data: str, prompt: str, *, split: str = "heldout",
                                  identities: int = 8, steps: int = 20, guidance_scale: float = 5.0,
                                  id_scale: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """DynamicID ``pipe`` (no edit, at ``id_scale``) given each front view of the first ``identities`` identities of
    ``split`` as its reference, one image each with ``prompt``: how often the generated face shows the reference's
    expression, beside the classifier on the references themselves: ``{"images", "split", "prompt", "id_scale",
    "references", "generated", "labels"}``."""
    from collections import Counter

    from synthface import dataset as sf_data, load_index
    from synthface.evaluation.scorer import SynthFaceScorer

    splits = load_index(data)["splits"]
    if split not in splits:
        raise ValueError(f"split must be one of {sorted(splits)} (the splits of {data}), got {split!r}")
    if not isinstance(identities, int) or isinstance(identities, bool) or identities < 1:
        raise ValueError(f"identities must be a positive integer, got {identities!r}")
    scorer = SynthFaceScorer.from_models_dir(models_dir)
    names = sorted(splits[split])[:identities]
    images, records = sf_data.load_split(data, split, names)
    front = [i for i, r in enumerate(records) if r["pose_name"] == "front"]
    references, truth = images[front], [records[i]["expression"] for i in front]
    generated = np.concatenate([np.asarray(pipe([prompt], [ref], steps=steps, guidance_scale=guidance_scale,
                                                seed=seed + i, height=ref.shape[0], width=ref.shape[1],
                                                id_scale=id_scale))
                                for i, ref in enumerate(references)])
    labels = expression_labels(scorer, generated)
    return {"images": len(references), "split": split, "prompt": prompt, "id_scale": id_scale,
            "references": float(np.mean([p == t for p, t in zip(expression_labels(scorer, references), truth)])),
            "generated": float(np.mean([p == t for p, t in zip(labels, truth)])),
            "labels": dict(sorted(Counter(labels).items()))}
