"""The real-image baselines of the SynthFace evaluation (:func:`synthface_baselines`): what real held-out SynthFace
images score by the rule the generated images are scored by (:mod:`dynamicid_jax.eval.scores`).

On the real held-out images: the same-identity *ceiling* (each non-reference image against its own identity's
reference) and the different-identity *baseline* over **all** ``n(n−1)/2`` pairs of held-out identities (pair
``{a, b}``: images of ``a`` against ``b``'s reference and images of ``b`` against ``a``'s, then the mean over
pairs); the expression classifier's accuracy on real front-view images of every expression, as rendered and after a
round trip through the base's VAE (the level the Expr target is relative to); attribute accuracy and two-person-scene
placement of real images.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dynamicid_jax.eval import bootstrap as B
from dynamicid_jax.eval import metrics as M
from dynamicid_jax.eval.metrics import pair_baseline
from dynamicid_jax.eval.scores import facesim_matrix, seed_of, vae_round_trip
from synthface import dataset as sf_data

__all__ = ["synthface_baselines"]


def synthface_baselines(data_dir: str, scorer, names: Sequence[str], ref_emb: np.ndarray, *,
                        vae=None, seed: int = 0, n_boot: int = B.DEFAULT_BOOT, split: str = "heldout"
                        ) -> dict[str, Any]:
    """What real SynthFace images of the identities ``names`` (of ``split``: the held-out ones, or the validation
    ones) score (references ``ref_emb``, one per name, as the methods are scored); see the module docstring.
    ``vae``: ``(AutoencoderKL, params)`` of the base for the round-trip expression accuracy."""
    images, records = sf_data.load_split(data_dir, split, names)
    ids = [r["identity"] for r in records]
    is_ref = np.array([r["image"] == "neutral_front.png" for r in records])
    dets = scorer.detect(list(images))
    found = np.array([len(d) > 0 for d in dets])
    keep = np.flatnonzero(~is_ref)
    sim = facesim_matrix([dets[i] for i in keep], ref_emb)
    kept_ids = [ids[i] for i in keep]
    pb = pair_baseline(sim, kept_ids, list(names))
    out: dict[str, Any] = {"identities": list(names), "images": int(len(images)),
                           "detection_rate": float(found.mean()), "same_identity": pb["same_identity"],
                           "different_identity": pb["different_identity"], "same_pairs": int(len(pb["same"])),
                           "different_pairs": len(pb["pairs"]), "different_identity_pairs": {
                               f"{a}|{b}": v for (a, b), v in sorted(pb["pairs"].items())}}
    ci = {"same_identity": B.interval(pb["same"], kept_ids, seed=seed_of(seed, "base.same")).to_dict(),
          "different_identity": {**B.interval(pb["per_image_different"], kept_ids,
                                              seed=seed_of(seed, "base.different")).to_dict(),
                                 "estimate": pb["different_identity"]}}
    out["ci"] = ci

    # expression: real front views of every expression, as rendered and after the base's VAE round trip
    if scorer.face_classifier is not None:
        front = [i for i, r in enumerate(records) if r["pose_name"] == "front"]
        truth = [records[i]["expression"] for i in front]
        groups = [ids[i] for i in front]
        refs_of = np.array([list(names).index(ids[i]) for i in front])
        variants = {"expression_accuracy_real": images[front]}
        if vae is not None:
            variants["expression_accuracy_round_trip"] = vae_round_trip(vae, images[front])
        for key, ims in variants.items():
            det = scorer.detect(list(ims))
            boxes = []
            for d, r in zip(det, refs_of):
                m = M.match_faces(d, ref_emb[[r]])
                boxes.append(d.boxes[int(m.face[0])] if m.matched[0] else None)
            have = [k for k, b in enumerate(boxes) if b is not None]
            pred = [None] * len(front)
            if have:
                labels = scorer.face_labels([ims[k] for k in have], np.stack([boxes[k] for k in have]))
                for k, v in zip(have, labels["expression"]):
                    pred[k] = v
            ok = np.array([p == t for p, t in zip(pred, truth)], float)
            iv = B.interval(ok, groups, seed=seed_of(seed, "base." + key))
            out[key] = iv.estimate
            ci[key] = iv.to_dict()
        out["expression_accuracy"] = out["expression_accuracy_real"]
    if scorer.scene_classifier is not None:
        pred = scorer.scene_labels(images)
        per = {k: M.accuracy(pred[k], [r["scene"][k] for r in records]) for k in ("background", "clothing",
                                                                                 "placement")}
        out["attributes"] = per
        out["attribute_accuracy"] = float(np.mean(list(per.values())))
    out.update(_scene_placement(data_dir, scorer, sf_data))
    return out


def _scene_placement(data_dir: str, scorer, sf_data) -> dict[str, Any]:
    from PIL import Image

    def rgb(p):
        return np.asarray(Image.open(p).convert("RGB"))

    placed, hits = [], []
    for s in sf_data.load_index(data_dir).get("scenes", []):
        path = os.path.join(data_dir, s)
        rec = sf_data.read_record(path)
        ref_paths = [os.path.join(data_dir, f["reference"]) for f in rec["faces"]]
        if not all(os.path.isfile(p) for p in ref_paths):
            continue
        refs = M.reference_embeddings(scorer, [rgb(p) for p in ref_paths], ref_paths,
                                      keypoints=[np.asarray(sf_data.read_record(p)["kps"]) for p in ref_paths])
        image = rgb(path)
        (det,) = scorer.detect([image])
        match = M.match_faces(det, refs)
        placed.extend(M.placed(match, det, np.array([f["box"] for f in rec["faces"]]), image.shape[:2]).tolist())
        hits.extend(match.matched.tolist())
    if not placed:
        return {}
    return {"scene_placement": float(np.mean(placed)), "scene_detection_rate": float(np.mean(hits)),
            "scene_faces": len(placed)}
