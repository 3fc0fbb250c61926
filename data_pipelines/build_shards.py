"""Build face-record shards from an image folder: ``python -m data_pipelines.build_shards --images DIR --out DIR
--analyzer NAME [--latents SD_PATH] [--clip-vision PATH]`` — or call :func:`build_shards` directly.

Input layout: ``DIR/{identity}/{image}`` (``.jpg .jpeg .png .webp .bmp``), with optional per-image annotations
next to the image (``{stem}`` = file name without extension; ``{name}.txt`` / ``{name}.json`` work too):

* ``{stem}.txt`` — the caption (whole file, whitespace collapsed);
* ``{stem}.json`` — a JSON object; ``"caption"`` (used when there is no ``.txt``), ``"face_prompt"`` (the IMR face
  prompt, e.g. ``"in a happy expression, in side view"``) and ``"expression"`` (used for the automatic face prompt
  when no ``face_prompt`` is given) are read; other keys are left to the analyzer (a ``synthetic`` backend may
  keep exact face values there: analyzers receive the image *path*).

For every image: detect (the largest face; with ``strict`` several faces skip the image), ArcFace-align a 112×112
crop, keep the embedding, 5 keypoints, dense landmarks and pose, and the face prompt (given, or automatic from the
pose: ``dynamicid_jax.faces.auto_face_prompt``). Optionally: VAE posterior moments (``mean ‖ logvar``) of the
resized + centre-cropped image (``--latents``: an SD folder, a ``vae/`` folder or a single ``.safetensors``) and
CLIP vision penultimate hidden states of the whole image (``--clip-vision``: a ``CLIPVisionModelWithProjection``
folder). Images without a face, unreadable files and (``strict``) multi-face images are skipped and counted by
reason in the manifest, with their paths.

Shards hold ``images_per_shard`` consecutive input images (sorted by identity, then file name); each is written to
a temp name and renamed, then its summary JSON is written. A rerun with the same inputs and options skips shards
whose summary fingerprint matches, so an interrupted build resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from dynamicid_jax import faces as F
from dynamicid_jax.file_io import write_json

from .schema import SCHEMA_VERSION, FaceRecord, resize_center_crop, to_signed_unit
from .shards import (
    MANIFEST_NAME,
    Manifest,
    ShardWriter,
    assemble_manifest,
    load_manifest,
    shard_name,
    summary_name,
)

__all__ = ["IMAGE_EXTENSIONS", "ImageItem", "discover_images", "read_annotations", "build_shards", "main"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: expression words other datasets use → the official classifier's labels (``dynamicid_jax.faces.EXPRESSIONS``)
EXPRESSION_ALIASES = {"surprised": "surprise", "angry": "anger", "disgusted": "disgust", "afraid": "fear",
                      "fearful": "fear", "scared": "fear", "sadness": "sad", "happiness": "happy", "joy": "happy"}


@dataclasses.dataclass(frozen=True)
class ImageItem:
    identity: int
    identity_name: str
    path: str
    key: str  # "{identity}/{file name}"


def discover_images(images_dir: str | os.PathLike, *, exclude: Sequence[str] = ()) -> tuple[list[str], list[ImageItem]]:
    """``(identity names, images)`` of an ``{identity}/{image}`` tree, both sorted; identity ids are the
    positions in the name list. Hidden entries and the folders in ``exclude`` are ignored."""
    root = os.fspath(images_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"images folder {root!r} does not exist")
    excluded = {os.path.realpath(p) for p in exclude}
    names, per_identity = [], []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(folder) or os.path.realpath(folder) in excluded:
            continue
        files = sorted(f for f in os.listdir(folder) if not f.startswith(".")
                       and f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))
        if files:
            names.append(name)
            per_identity.append(files)
    if not names:
        raise ValueError(f"no images found in {root!r}: expected the layout {{identity}}/{{image}} with image "
                         f"files ({', '.join(IMAGE_EXTENSIONS)}) inside one folder per identity")
    items = [ImageItem(i, name, os.path.join(root, name, f), f"{name}/{f}")
             for i, (name, files) in enumerate(zip(names, per_identity)) for f in files]
    return names, items


def _sidecar(path: str, ext: str) -> str | None:
    stem = os.path.splitext(path)[0]
    for candidate in (stem + ext, path + ext):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_annotations(image_path: str) -> dict:
    """The caption / face prompt / expression given next to an image (module docstring); ``files`` lists the
    annotation files read (their contents are part of the shard fingerprint)."""
    out: dict[str, Any] = {"caption": None, "face_prompt": None, "expression": None, "files": {}}
    json_path = _sidecar(image_path, ".json")
    if json_path is not None:
        with open(json_path, encoding="utf-8") as f:
            text = f.read()
        out["files"][json_path] = text
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"annotation file {json_path!r}: invalid JSON ({err})") from err
        if not isinstance(meta, dict):
            raise ValueError(f"annotation file {json_path!r}: expected a JSON object")
        for key in ("caption", "face_prompt", "expression"):
            value = meta.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"annotation file {json_path!r}: {key!r} must be a string, got {value!r}")
            out[key] = value
    txt_path = _sidecar(image_path, ".txt")
    if txt_path is not None:
        with open(txt_path, encoding="utf-8") as f:
            text = f.read()
        out["files"][txt_path] = text
        out["caption"] = " ".join(text.split())
    if out["expression"] is not None:
        expr = out["expression"].strip().lower()
        expr = EXPRESSION_ALIASES.get(expr, expr)
        if expr not in F.EXPRESSIONS:
            raise ValueError(f"annotation for {image_path!r}: unknown expression {out['expression']!r}; expected "
                             f"one of {', '.join(F.EXPRESSIONS)} (or {', '.join(EXPRESSION_ALIASES)})")
        out["expression"] = expr
    return out


def _image_bytes(path: str, rgb: np.ndarray) -> tuple[bytes, str]:
    """The file's own bytes when it is a JPEG / PNG that decodes to ``rgb`` as is; else a PNG of ``rgb``."""
    from PIL import Image

    with Image.open(path) as img:
        fmt, mode, orientation = img.format, img.mode, img.getexif().get(0x0112, 1)
    if fmt in ("JPEG", "PNG") and mode in ("RGB", "RGBA", "L", "LA", "P") and orientation == 1:
        with open(path, "rb") as f:
            return f.read(), fmt.lower()
    return _png(rgb), "png"


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- encoders

class _Encoders:
    """Precomputed features: VAE moments and CLIP penultimate states, jitted, in fixed-size padded batches."""

    def __init__(self, latents: str | None, clip_vision: str | None, resolution: int, batch_size: int):
        import jax

        self.resolution, self.batch_size = resolution, batch_size
        self.vae_info = self.clip_info = None
        if latents is not None:
            vae, params = _load_vae_any(latents)
            if resolution % vae.config.downsample_factor:
                raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor "
                                 f"{vae.config.downsample_factor}")
            self._vae_params = params
            self._vae = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode").moments)
            f = vae.config.downsample_factor
            self.vae_info = {"resolution": resolution, "downsample_factor": f,
                             "shape": [resolution // f, resolution // f, 2 * vae.config.latent_channels],
                             "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor,
                             "source": os.fspath(latents)}
        if clip_vision is not None:
            from dynamicid_jax.models.clip import load_image_encoder

            model, params = load_image_encoder(clip_vision)
            self._clip_params, self._clip_size = params, model.config.image_size
            self._clip = jax.jit(lambda p, x: model.apply({"params": p}, x).hidden_states[-2])
            c = model.config
            self.clip_info = {"image_size": c.image_size, "shape": [c.num_positions, c.hidden_size],
                              "layer": "penultimate", "source": os.fspath(clip_vision)}

    def _batched(self, fn, params, x: np.ndarray) -> np.ndarray:
        n, out = len(x), []
        for start in range(0, n, self.batch_size):
            chunk = x[start:start + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(fn(params, chunk))[:self.batch_size - pad])
        return np.concatenate(out)

    def latent_moments(self, images: list[np.ndarray]) -> np.ndarray:
        crops = np.stack([to_signed_unit(resize_center_crop(im, self.resolution)) for im in images])
        return self._batched(self._vae, self._vae_params, crops)

    def clip_features(self, images: list[np.ndarray]) -> np.ndarray:
        from dynamicid_jax.models.clip import clip_preprocess

        return self._batched(self._clip, self._clip_params, clip_preprocess(images, size=self._clip_size))


def _load_vae_any(path: str):
    from dynamicid_jax.models.vae import load_vae

    if os.path.isfile(path):
        from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion

        sd = StableDiffusion.from_pretrained(path)
        return sd.vae, sd.params["vae"]
    return load_vae(path)


# ------------------------------------------------------------------------------------------------ build

def _resolve_analyzer(analyzer: str | F.FaceAnalyzer, kwargs: dict | None) -> tuple[F.FaceAnalyzer, str]:
    if isinstance(analyzer, str):  # plug-in backends (e.g. SynthFace's synthetic) load on first use
        return F.get_analyzer(analyzer, **(kwargs or {})), analyzer
    if kwargs:
        raise ValueError("analyzer_kwargs are only for an analyzer given by name")
    if not isinstance(analyzer, F.FaceAnalyzer):
        raise TypeError(f"analyzer: expected a backend name or a FaceAnalyzer, got {type(analyzer).__name__}")
    return analyzer, str(getattr(analyzer, "name", type(analyzer).__name__))


def _fingerprint(options: dict, items: Sequence[ImageItem], annotations: Sequence[dict]) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=repr).encode())
    for item, ann in zip(items, annotations):
        st = os.stat(item.path)
        h.update(json.dumps([item.key, item.identity, st.st_size, st.st_mtime_ns,
                             sorted((os.path.basename(k), v) for k, v in ann["files"].items())]).encode())
    return h.hexdigest()


def _analyze(item: ImageItem, ann: dict, analyzer: F.FaceAnalyzer, analyzer_name: str, strict: bool,
             default_caption: str) -> tuple[FaceRecord | None, np.ndarray | None, str | None, bool]:
    """``(record without features, rgb, skip reason, several faces found)``."""
    try:
        rgb = F.load_rgb(item.path)
    except (ValueError, OSError):
        return None, None, "unreadable", False
    try:
        found = analyzer.analyze(item.path)
    except F.NoFaceError:
        found = []
    if not found:
        return None, None, "no_face", False
    several = len(found) > 1
    if several and strict:
        return None, None, "multiple_faces", True
    face = F.largest_face(found)
    image, fmt = _image_bytes(item.path, rgb)
    if ann["face_prompt"] is not None:
        prompt, source = ann["face_prompt"], "sidecar"
    else:
        prompt, source = F.auto_face_prompt(face.pose, ann["expression"] or "neutral"), "auto"
    rec = FaceRecord(
        key=item.key, identity=item.identity, identity_name=item.identity_name, image=image, image_format=fmt,
        image_size=(rgb.shape[1], rgb.shape[0]), face_crop=_png(F.align_face(rgb, face.kps, 112)),
        bbox=face.bbox, kps=face.kps, landmarks=face.landmarks, pose=face.pose, embedding=face.embedding,
        det_score=face.det_score, analyzer=analyzer_name,
        caption=ann["caption"] if ann["caption"] is not None else default_caption,
        face_prompt=prompt, face_prompt_source=source, expression=ann["expression"])
    return rec, rgb, None, several


def build_shards(images_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 analyzer: str | F.FaceAnalyzer = "insightface", *, analyzer_kwargs: dict | None = None,
                 latents: str | None = None, clip_vision: str | None = None, resolution: int = 512,
                 images_per_shard: int = 256, feature_dtype: str = "float32", default_caption: str = "",
                 strict: bool = False, encode_batch_size: int = 8, progress: bool = True,
                 prefix: str = "faces") -> Manifest:
    """Analyse ``images_dir`` (``{identity}/{image}``) into ArrayRecord shards + ``manifest.json`` in ``out_dir``.

    Args:
      analyzer: a registered backend name (``"insightface"``, ``"dlib"``, ``"synthetic"``, …) built with
        ``analyzer_kwargs``, or a ready :class:`~dynamicid_jax.faces.FaceAnalyzer`.
      latents: SD model (folder, ``vae/`` folder or single ``.safetensors``) → store VAE moments of the image
        resized (shortest side) and centre-cropped to ``resolution``.
      clip_vision: CLIP vision folder → store its penultimate hidden states of the whole image.
      feature_dtype: ``"float32"`` or ``"float16"`` storage of the precomputed features (loaders return float32).
      strict: skip images with several faces (default: use the largest and count it).
      encode_batch_size: batch size of the VAE / CLIP passes.
    Returns the :class:`~data_pipelines.shards.Manifest` (also written to ``out_dir/manifest.json``).
    """
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    if feature_dtype not in ("float32", "float16"):
        raise ValueError(f"feature_dtype must be 'float32' or 'float16', got {feature_dtype!r}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    out_dir = os.fspath(out_dir)
    names, items = discover_images(images_dir, exclude=[out_dir])
    face_analyzer, analyzer_name = _resolve_analyzer(analyzer, analyzer_kwargs)
    encoders = _Encoders(latents, clip_vision, resolution, encode_batch_size) if (latents or clip_vision) else None
    os.makedirs(out_dir, exist_ok=True)
    store = np.float16 if feature_dtype == "float16" else np.float32
    options = {"schema": SCHEMA_VERSION, "analyzer": analyzer_name, "analyzer_kwargs": analyzer_kwargs or {},
               "embedding_dim": int(face_analyzer.embedding_dim), "latents": encoders and encoders.vae_info,
               "clip": encoders and encoders.clip_info, "dtype": feature_dtype, "caption": default_caption,
               "strict": strict, "identities": names}
    count = -(-len(items) // images_per_shard)
    summaries = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc="face shards", unit="img", disable=not progress)
    try:
        for k in range(count):
            chunk = items[k * images_per_shard:(k + 1) * images_per_shard]
            annotations = [read_annotations(item.path) for item in chunk]
            fingerprint = _fingerprint(options, chunk, annotations)
            shard_path = os.path.join(out_dir, shard_name(k, count, prefix))
            summary_path = os.path.join(out_dir, summary_name(k, count, prefix))
            done = _finished_summary(shard_path, summary_path, fingerprint)
            if done is None:
                done = _build_shard(chunk, annotations, face_analyzer, analyzer_name, strict, default_caption,
                                    encoders, store, shard_path, bar)
                done["fingerprint"] = fingerprint
                write_json(done, summary_path)
            else:
                bar.update(len(chunk))
            summaries.append(done)
    finally:
        bar.close()
    extra = {
        "record_schema_version": SCHEMA_VERSION,
        "analyzer": {"name": analyzer_name, "embedding_dim": int(face_analyzer.embedding_dim),
                     "num_landmarks": int(face_analyzer.num_landmarks)},
        "embedding_dim": int(face_analyzer.embedding_dim),
        "latents": None if encoders is None or encoders.vae_info is None else {**encoders.vae_info,
                                                                              "dtype": feature_dtype},
        "clip_features": None if encoders is None or encoders.clip_info is None else {**encoders.clip_info,
                                                                                     "dtype": feature_dtype},
        "counts": {"images_found": len(items),
                   "multiple_faces_used_largest": sum(s["multiple_faces_used_largest"] for s in summaries),
                   "sidecar_face_prompts": sum(s["sidecar_face_prompts"] for s in summaries),
                   "captions": sum(s["captions"] for s in summaries)},
    }
    manifest = assemble_manifest(summaries, names, extra)
    write_json(manifest, os.path.join(out_dir, MANIFEST_NAME))
    return load_manifest(out_dir)


def _finished_summary(shard_path: str, summary_path: str, fingerprint: str) -> dict | None:
    if not (os.path.isfile(shard_path) and os.path.isfile(summary_path)):
        return None
    try:
        with open(summary_path) as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return summary if summary.get("fingerprint") == fingerprint else None


def _build_shard(chunk, annotations, analyzer, analyzer_name, strict, default_caption, encoders, store,
                 shard_path, bar) -> dict:
    summary = {"file": os.path.basename(shard_path), "keys": [], "record_identities": [], "skipped": [],
               "images_per_identity": {}, "multiple_faces_used_largest": 0, "sidecar_face_prompts": 0,
               "captions": 0}
    pending: list[tuple[FaceRecord, np.ndarray]] = []

    def flush(writer: ShardWriter) -> None:
        if not pending:
            return
        if encoders is not None:
            images = [rgb for _, rgb in pending]
            moments = encoders.latent_moments(images) if encoders.vae_info else None
            feats = encoders.clip_features(images) if encoders.clip_info else None
            for j, (rec, _) in enumerate(pending):
                if moments is not None:
                    rec.latent_moments = moments[j].astype(store)
                    rec.latent_resolution = encoders.resolution
                if feats is not None:
                    rec.clip_features = feats[j].astype(store)
        for rec, _ in pending:
            writer.write(rec.to_bytes())
            summary["keys"].append(rec.key)
            summary["record_identities"].append(rec.identity)
        pending.clear()

    with ShardWriter(shard_path) as writer:
        for item, ann in zip(chunk, annotations):
            ident = str(item.identity)
            summary["images_per_identity"][ident] = summary["images_per_identity"].get(ident, 0) + 1
            rec, rgb, reason, several = _analyze(item, ann, analyzer, analyzer_name, strict, default_caption)
            bar.update(1)
            if rec is None:
                summary["skipped"].append({"key": item.key, "reason": reason})
                continue
            summary["multiple_faces_used_largest"] += int(several)
            summary["sidecar_face_prompts"] += int(rec.face_prompt_source == "sidecar")
            summary["captions"] += int(bool(rec.caption))
            pending.append((rec, rgb))
            if encoders is None or len(pending) >= encoders.batch_size:
                flush(writer)
        flush(writer)
    return summary


# ------------------------------------------------------------------------------------------------- CLI

def _parse_kv(values: Sequence[str]) -> dict:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--analyzer-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> Manifest:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.build_shards",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder laid out as {identity}/{image}")
    parser.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    parser.add_argument("--analyzer", required=True,
                        help=f"face-analysis backend; registered now: {', '.join(F.available_backends())}")
    parser.add_argument("--analyzer-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="backend keyword argument (VALUE parsed as JSON when possible); repeatable")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (a plug-in that is not installed, e.g. one that registers another "
                        "backend: docs/architecture.md); repeatable")
    parser.add_argument("--latents", help="SD model (folder / vae folder / .safetensors): precompute VAE moments")
    parser.add_argument("--image-encoder", dest="clip_vision", metavar="PATH",
                        help="CLIP vision model folder: precompute penultimate features")
    parser.add_argument("--resolution", type=int, default=512, help="crop size of the precomputed latents")
    parser.add_argument("--images-per-shard", type=int, default=256)
    parser.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--default-caption", default="", help="caption of images without one")
    parser.add_argument("--strict", action="store_true", help="skip images showing several faces")
    parser.add_argument("--batch-size", type=int, default=8, help="VAE / CLIP batch size")
    parser.add_argument("--no-progress", action="store_true")
    from dynamicid_jax.cli_args import add_deprecated_alias

    add_deprecated_alias(parser, "--clip-vision", "--image-encoder")
    args = parser.parse_args(argv)
    from dynamicid_jax.plugins import load_plugin

    for module in args.imports:
        load_plugin(module, source="--import")
    from dynamicid_jax.file_io import check_readable, check_writable

    check_readable(args.images, "--images")
    if not os.path.isdir(args.images):
        raise FileNotFoundError(f"--images {args.images!r} is not a folder (expected {{identity}}/{{image}} files)")
    check_writable(args.out, "--out", folder=True)
    manifest = build_shards(args.images, args.out, args.analyzer, analyzer_kwargs=_parse_kv(args.analyzer_arg),
                            latents=args.latents, clip_vision=args.clip_vision, resolution=args.resolution,
                            images_per_shard=args.images_per_shard, feature_dtype=args.feature_dtype,
                            default_caption=args.default_caption, strict=args.strict,
                            encode_batch_size=args.batch_size, progress=not args.no_progress)
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(manifest.skipped.items())) or "none"
    print(f"{manifest.num_records} records of {manifest.num_identities} identities in {len(manifest.shards)} "
          f"shard(s) at {args.out}; skipped: {skipped}", file=sys.stdout)
    return manifest


if __name__ == "__main__":
    from dynamicid_jax.errors import run_cli

    raise SystemExit(run_cli(main))
