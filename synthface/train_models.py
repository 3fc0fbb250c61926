"""Train SynthFace's face models on a generated tree and measure them on its held-out identities and scenes.

``python -m synthface.train_models --data DIR --out MODELS [--steps-scale 1.0] [--only NAMES]``

Writes one sub-folder per model (``params.safetensors`` + ``config.json``) and ``MODELS/metrics.json``:

=================== ========================================================== =============================
``recognizer/``      input "ArcFace" (ID encoder input; ``synthetic`` backend)   verification AUC on held-out
``detector/``        face detector for images without sidecars                   recall / precision on scenes
``landmarker/``      68 landmarks + pose from a face box                         NME on held-out
``eval_recognizer/`` second recogniser, other architecture and seed (FaceSim)    verification AUC on held-out
``face_classifier/`` expression (7) + pose (5) from a face crop (Expr / Pose)    accuracy on held-out
``scene_classifier/`` background, clothing, placement (prompt alignment)         accuracy on held-out
``image_encoder/``   tiny CLIP vision tower that sees faces (the ID encoder's      linear-probe accuracy of
                     second input; :mod:`.image_encoder`)                          expression / pose, held-out
=================== ========================================================== =============================

Only training identities are trained on; held-out identities and scenes are for measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .background import BackgroundJob
from .dataset import load_index, load_split

MODELS = ("recognizer", "eval_recognizer", "detector", "landmarker", "face_classifier", "scene_classifier",
          "image_encoder")
#: training steps at --steps-scale 1 (batch 64; the detector 32 tiles of 64²)
STEPS = {"recognizer": 600, "eval_recognizer": 500, "detector": 600, "landmarker": 400, "face_classifier": 500,
         "scene_classifier": 250, "image_encoder": 1200}

__all__ = ["MODELS", "STEPS", "train_all", "evaluate", "main"]


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _labels(records: list[dict], key) -> tuple[np.ndarray, list[str]]:
    values = [key(r) for r in records]
    names = sorted(set(values))
    return np.array([names.index(v) for v in values]), names


def _arrays(records: list[dict]) -> dict[str, np.ndarray]:
    return {"kps": np.array([r["kps"] for r in records], np.float64),
            "bbox": np.array([r["bbox"] for r in records], np.float64),
            "landmarks": np.array([r["landmarks"] for r in records], np.float64),
            "pose": np.array([r["pose"] for r in records], np.float64)}


def _pair_canvases(images: np.ndarray, boxes: np.ndarray, rng: np.random.Generator):
    """Portraits side by side in pairs → ``[N/2, H, 2W, 3]`` canvases with both faces' boxes."""
    order = rng.permutation(len(images))
    order = order[: len(order) // 2 * 2].reshape(-1, 2)
    w = images.shape[2]
    canvases = np.concatenate([images[order[:, 0]], images[order[:, 1]]], axis=2)
    shift = np.array([w, 0, w, 0], np.float64)
    return canvases, [np.stack([boxes[a], boxes[b] + shift]) for a, b in order]


def train_all(data_dir: str, out_dir: str, *, steps_scale: float = 1.0, steps: Mapping[str, int] | None = None,
              only: Sequence[str] | None = None,
              seed: int = 0, progress: bool = True, evaluate_after: bool = True) -> dict[str, Any]:
    """Train the models (all, or ``only``) on ``data_dir``'s training split into ``out_dir``; returns metrics.
    Each model trains :data:`STEPS` × ``steps_scale`` steps unless ``steps`` names its count."""
    from synthface.evaluation.classifiers import ClassifierConfig, train_classifier, train_eval_recognizer
    from synthface.faces.detector import train_detector, train_landmarker
    from synthface.faces.recognizer import train_recognizer

    index = load_index(data_dir)
    names = list(MODELS if only is None else only)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown model names {unknown}; choose from {list(MODELS)}")
    unknown_steps = sorted(set(steps or {}) - set(MODELS))
    if unknown_steps:
        raise ValueError(f"steps: unknown model names {unknown_steps}; choose from {list(MODELS)}")
    steps = {**{k: max(1, int(round(v * steps_scale))) for k, v in STEPS.items()}, **dict(steps or {})}
    images, records = load_split(data_dir, "train")
    arr = _arrays(records)
    ident, _ = _labels(records, lambda r: r["identity"])
    os.makedirs(out_dir, exist_ok=True)
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}
    # The image encoder, the longest job, trains in a second thread while the others train here: each job keeps
    # about one core busy, so on two cores this nearly halves the wall time. Results are unchanged (every model
    # has its own seed and XLA programs); CPU seconds are then the whole process's, both jobs together.
    image_encoder_job = None
    if "image_encoder" in names:
        image_encoder_job = BackgroundJob(lambda: _train_image_encoder(
            data_dir, images, records, index, ident, steps["image_encoder"], seed, progress,
            os.path.join(out_dir, "image_encoder")))

    def run(name, fn):
        if name in names:
            t0, c0 = time.time(), time.process_time()
            model = fn()
            timings[name] = round(time.time() - t0, 2)
            cpu_timings[name] = round(time.process_time() - c0, 2)  # all threads of this process
            model.metrics.update(train_seconds=timings[name], train_cpu_seconds=cpu_timings[name])
            model.save(os.path.join(out_dir, name))

    run("recognizer", lambda: train_recognizer(images, arr["kps"], ident, steps=steps["recognizer"], seed=seed,
                                               progress=progress))
    run("eval_recognizer", lambda: train_eval_recognizer(images, arr["kps"], ident, steps=steps["eval_recognizer"],
                                                         seed=seed + 1, progress=progress))

    def detector():
        canvases, boxes = _pair_canvases(images, arr["bbox"], np.random.default_rng(seed))
        return train_detector(canvases, boxes, steps=steps["detector"], seed=seed, progress=progress)

    run("detector", detector)
    run("landmarker", lambda: train_landmarker(images, arr["bbox"], arr["landmarks"], arr["pose"],
                                               steps=steps["landmarker"], seed=seed, progress=progress))
    expr = np.array([index["expressions"].index(r["expression"]) for r in records])
    pose = np.array([index["poses"].index(r["pose_name"]) for r in records])
    face_cfg = ClassifierConfig(heads=(("expression", tuple(index["expressions"])), ("pose", tuple(index["poses"]))))
    run("face_classifier", lambda: train_classifier(images, {"expression": expr, "pose": pose}, face_cfg,
                                                    arr["bbox"], steps=steps["face_classifier"], seed=seed,
                                                    progress=progress))
    scene_keys = (("background", "backgrounds"), ("clothing", "clothing"), ("placement", "placements"))
    scene_labels = {k: np.array([index[v].index(r["scene"][k]) for r in records]) for k, v in scene_keys}
    scene_cfg = ClassifierConfig(heads=tuple((k, tuple(index[v])) for k, v in scene_keys), input="region",
                                 crop_size=32)
    run("scene_classifier", lambda: train_classifier(images, scene_labels, scene_cfg, steps=steps["scene_classifier"],
                                                     seed=seed, progress=progress))
    if image_encoder_job is not None:
        result_ie = image_encoder_job.result()
        timings["image_encoder"], cpu_timings["image_encoder"] = result_ie.pop("seconds"), result_ie.pop("cpu")
    result: dict[str, Any] = {"train_seconds": timings, "train_cpu_seconds": cpu_timings,
                              "steps": {k: steps[k] for k in names}, "train_images": int(len(images)),
                              "train_identities": int(ident.max() + 1)}
    if evaluate_after:
        result.update(evaluate(data_dir, out_dir))
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    return result


def _train_image_encoder(data_dir, images, records, index, ident, steps, seed, progress, folder) -> dict:
    """Train and save the image encoder; record linear-probe accuracies of expression and pose on held-out
    identities (probe fit on training identities) in its ``heads.json`` metrics."""
    from .image_encoder import image_encoder_accuracy, train_image_encoder

    t0, c0 = time.time(), time.process_time()
    expr = np.array([index["expressions"].index(r["expression"]) for r in records])
    pose = np.array([index["poses"].index(r["pose_name"]) for r in records])
    names = {"identity": sorted(set(r["identity"] for r in records)), "expression": list(index["expressions"]),
             "pose": list(index["poses"])}
    result = train_image_encoder(images, {"identity": ident, "expression": expr, "pose": pose}, names, steps=steps,
                                 seed=seed, progress=progress)
    if index["splits"].get("heldout"):
        held, held_records = load_split(data_dir, "heldout")
        for head in ("expression", "pose"):
            key = "expression" if head == "expression" else "pose_name"
            y_train = np.array([r[key] for r in records])
            y_held = np.array([r[key] for r in held_records])
            result.metrics[f"probe_{head}_heldout"] = image_encoder_accuracy(
                result.module, result.params, images, y_train, held, y_held)
    result.metrics.update(train_seconds=round(time.time() - t0, 2), train_cpu_seconds=round(time.process_time() - c0, 2))
    result.save(folder)
    return {"seconds": result.metrics["train_seconds"], "cpu": result.metrics["train_cpu_seconds"]}


def evaluate(data_dir: str, models_dir: str, max_images: int = 700) -> dict[str, Any]:
    """Measure whatever models ``models_dir`` holds on the held-out identities and the scenes of ``data_dir``."""
    from PIL import Image

    from synthface.evaluation.classifiers import AttributeClassifier
    from synthface.faces.backend import kps_from_landmarks
    from synthface.faces.detector import (
        SyntheticDetector,
        SyntheticLandmarker,
        box_iou,
        detection_metrics,
    )
    from synthface.faces.recognizer import (
        SyntheticRecognizer,
        identification_accuracy,
        verification_metrics,
    )

    index = load_index(data_dir)
    images, records = load_split(data_dir, "heldout")
    if len(images) > max_images:
        keep = np.random.default_rng(0).choice(len(images), max_images, replace=False)
        keep.sort()
        images, records = images[keep], [records[i] for i in keep]
    arr = _arrays(records)
    ident = np.array([r["identity"] for r in records])
    out: dict[str, Any] = {"heldout_images": int(len(images)), "heldout_identities": int(len(set(ident)))}

    def path(name: str) -> str:
        return os.path.join(models_dir, name)

    gallery = np.array([r["image"] == "neutral_front.png" for r in records])

    recs = {}
    for name in ("recognizer", "eval_recognizer"):
        if os.path.isdir(path(name)):
            rec = SyntheticRecognizer.load(path(name))
            recs[name] = rec
            emb = rec.embed(images, arr["kps"])
            m = verification_metrics(emb, ident)
            if gallery.any() and (~gallery).any():
                m["identification_top1"] = identification_accuracy(emb[gallery], ident[gallery], emb[~gallery],
                                                                   ident[~gallery])
            out[name] = m
    if os.path.isdir(path("landmarker")):
        lmk = SyntheticLandmarker.load(path("landmarker"))
        pred, pose = lmk.predict(images, arr["bbox"])
        iod = np.linalg.norm(arr["kps"][:, 0] - arr["kps"][:, 1], axis=1)
        nme = np.linalg.norm(pred - arr["landmarks"], axis=2).mean(1) / np.maximum(iod, 1e-6)
        out["landmarker"] = {"nme_interocular": float(nme.mean()),
                             "kps_mean_error_px": float(np.linalg.norm(
                                 np.stack([kps_from_landmarks(p) for p in pred]) - arr["kps"], axis=2).mean()),
                             "yaw_mae_deg": float(np.abs(pose[:, 1] - arr["pose"][:, 1]).mean())}
    if os.path.isdir(path("face_classifier")):
        clf = AttributeClassifier.load(path("face_classifier"))
        out["face_classifier"] = clf.accuracy(images, {"expression": [r["expression"] for r in records],
                                                       "pose": [r["pose_name"] for r in records]}, arr["bbox"])
    if os.path.isdir(path("scene_classifier")):
        clf = AttributeClassifier.load(path("scene_classifier"))
        out["scene_classifier"] = clf.accuracy(images, {k: [r["scene"][k] for r in records]
                                                        for k in ("background", "clothing", "placement")})
    scenes = [os.path.join(data_dir, s) for s in index.get("scenes", [])]
    if scenes:
        scene_imgs = [np.asarray(Image.open(s).convert("RGB")) for s in scenes]
        scene_recs = [_read_json(os.path.splitext(s)[0] + ".json") for s in scenes]
        gt_boxes = [np.array([f["bbox"] for f in r["faces"]]) for r in scene_recs]
        if os.path.isdir(path("detector")):
            det = SyntheticDetector.load(path("detector"))
            out["detector_scenes"] = detection_metrics(det, scene_imgs, gt_boxes)
            out["detector_portraits"] = detection_metrics(det, list(images[:200]),
                                                          [b[None] for b in arr["bbox"][:200]])
            if "recognizer" in recs and os.path.isdir(path("landmarker")):
                out["scene_identification"] = _scene_identification(
                    data_dir, scene_imgs, scene_recs, det, SyntheticLandmarker.load(path("landmarker")),
                    recs["recognizer"], box_iou)
        if os.path.isdir(path("scene_classifier")):
            clf = AttributeClassifier.load(path("scene_classifier"))
            strips, labels = [], {"background": [], "clothing": []}
            for im, r in zip(scene_imgs, scene_recs):
                h, w = im.shape[:2]
                for f in r["faces"]:
                    y0, x0, y1, x1 = f["box"]
                    strips.append((im, [x0 * w - 0.5, y0 * h - 0.5, x1 * w - 0.5, y1 * h - 0.5]))
                    labels["background"].append(r["background"])
                    labels["clothing"].append(f["clothing"])
            out["scene_classifier_strips"] = clf.accuracy([s[0] for s in strips], labels,
                                                          np.array([s[1] for s in strips]))
    return out


def _scene_identification(data_dir, scene_imgs, scene_recs, det, lmk, rec, box_iou) -> dict[str, float]:
    """End to end on scenes, no sidecars: detect, landmark, embed; each detected face (matched to a true box at
    IoU ≥ 0.5) is identified among the scene's people by their neutral-front reference embedding."""
    from PIL import Image

    from synthface.faces.backend import kps_from_landmarks

    hits = total = 0
    for im, r in zip(scene_imgs, scene_recs):
        refs = []
        for f in r["faces"]:
            ref_path = os.path.join(data_dir, f["reference"])
            ref = _read_json(os.path.splitext(ref_path)[0] + ".json")
            refs.append(rec.embed(np.asarray(Image.open(ref_path).convert("RGB"))[None], np.array([ref["kps"]]))[0])
        boxes, _ = det.detect(im)
        total += len(r["faces"])
        if not len(boxes):
            continue
        landmarks, _ = lmk.predict([im] * len(boxes), boxes)
        emb = rec.embed([im] * len(boxes), np.stack([kps_from_landmarks(p) for p in landmarks]))
        iou = box_iou(boxes, np.array([f["bbox"] for f in r["faces"]]))
        for i in range(len(boxes)):
            j = int(np.argmax(iou[i]))
            if iou[i, j] >= 0.5 and int(np.argmax(np.stack(refs) @ emb[i])) == j:
                hits += 1
    return {"accuracy": hits / max(total, 1), "faces": total}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m synthface.train_models",
                                description="Train and measure SynthFace's face models.")
    p.add_argument("--data", required=True, help="a SynthFace folder (python -m synthface)")
    p.add_argument("--out", required=True, help="models folder to write")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every model's training steps")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eval", action="store_true", help="skip the held-out measurements")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    only = None if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    result = train_all(args.data, args.out, steps_scale=args.steps_scale, only=only, seed=args.seed,
                       progress=not args.quiet, evaluate_after=not args.no_eval)
    print(json.dumps(result, indent=1, sort_keys=True))
    return result


if __name__ == "__main__":
    from dynamicid_jax.errors import run_cli

    raise SystemExit(run_cli(main))
