"""The embedded demo: what runs on a fresh CPU machine with no model download.

    python -m infer.demo --out demo_out [--quick]

It writes into ``--out``: ``faces.png`` / ``faces.md`` — real face analysis with real offline weights (dlib) on
the group photo shipped with insightface: boxes, 5-point keypoints, head pose, SPEC §5's automatic face prompt per
face, and the identity-similarity matrix — plus ``summary.json``.

This is the part of the system that has real weights on a fresh machine today. The trained SynthFace demo
(stage 0 → 1 → 2 in the embedded world, single-/multi-ID and edit images, gate maps, metrics) is not built yet.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def face_section(out: str) -> dict:
    from PIL import Image, ImageDraw

    from dynamicid_jax.faces import auto_face_prompt, get_analyzer
    from dynamicid_jax.image_io import save_png
    from insightface.data import get_image

    image = np.ascontiguousarray(get_image("t1")[:, :, ::-1])  # insightface ships BGR
    analyzer = get_analyzer("dlib")
    start = time.perf_counter()
    faces = sorted(analyzer.analyze(image), key=lambda f: f.bbox[0])
    seconds = time.perf_counter() - start
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for i, face in enumerate(faces):
        x0, y0, x1, y1 = (float(v) for v in face.bbox)
        draw.rectangle([x0, y0, x1, y1], outline=(255, 64, 64), width=3)
        for x, y in face.kps:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(64, 255, 64))
        draw.text((x0 + 4, y0 + 4), str(i), fill=(255, 255, 0))
    save_png(np.asarray(canvas), os.path.join(out, "faces.png"))
    emb = np.stack([f.embedding for f in faces])
    similarity = emb @ emb.T
    rows = ["| face | det score | pitch | yaw | roll | automatic face prompt |", "|---|---|---|---|---|---|"]
    for i, f in enumerate(faces):
        rows.append(f"| {i} | {f.det_score:.2f} | {f.pitch:+.1f} | {f.yaw:+.1f} | {f.roll:+.1f} | "
                    f"{auto_face_prompt(f.pose)} |")
    sim = ["| | " + " | ".join(map(str, range(len(faces)))) + " |", "|---" * (len(faces) + 1) + "|"]
    for i in range(len(faces)):
        sim.append(f"| {i} | " + " | ".join(f"{similarity[i, j]:.2f}" for j in range(len(faces))) + " |")
    with open(os.path.join(out, "faces.md"), "w") as f:
        f.write(f"# Face analysis (dlib backend, real weights)\n\n{len(faces)} faces found in {seconds:.2f}s.\n\n"
                + "\n".join(rows) + "\n\n## Identity similarity (cosine of 128-d embeddings)\n\n"
                + "\n".join(sim) + "\n")
    off_diag = similarity[~np.eye(len(faces), dtype=bool)]
    _log(f"faces: {len(faces)} found in {seconds:.2f}s; max cross-identity cosine {off_diag.max():.2f}")
    return {"faces": len(faces), "analysis_s": seconds, "max_cross_identity_cosine": float(off_diag.max()),
            "crops": [image[int(f.bbox[1]):int(f.bbox[3]), int(f.bbox[0]):int(f.bbox[2])] for f in faces[:2]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.demo", description="the embedded dynamicid-jax demo")
    p.add_argument("--out", default="demo_out")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    _log("face analysis on a real photo (dlib, offline weights)")
    summary = {"faces": {k: v for k, v in face_section(args.out).items() if k != "crops"}}
    summary["total_s"] = time.perf_counter() - start
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _log(f"done in {summary['total_s']:.1f}s → {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
