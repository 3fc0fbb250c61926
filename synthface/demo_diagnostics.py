"""Diagnostics of the demo's trained pieces: what the stage-1 ID tokens carry, and whether the IMR's edits differ.

Two questions decide whether expression editing can work at all (docs/demo.md): do the ID tokens of one identity
change with its expression (else the IMR has nothing to reconfigure), and do the IMR's edits towards different
expressions move the tokens in different directions (else the seven edits look alike)?

* :func:`token_variance_shares` — over the stage-2 token cache (one token set per training image): the share of the
  total variance that lies between identities, and of the within-identity variance the share explained by the
  expression, the pose and the background colour (sum of squared group means of the within-identity residuals).
* :func:`edit_shift_similarity` — one reference edited towards each of the seven expressions: the mean pairwise
  cosine of the token shifts (1.0: one shift whatever is asked) and their norms.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["token_variance_shares", "edit_shift_similarity"]


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
            "prompts": list(face_prompts)}
