"""Finding SynthFace faces in images that have no annotations (e.g. generated ones): a detector and a landmarker.

* :class:`SyntheticDetector` — a small fully convolutional net in the style of CenterNet (Zhou et al., 2019,
  "Objects as Points"): at stride 8 it predicts a face-centre heatmap, the box size (log) and the sub-cell centre
  offset. Peaks of the heatmap (3×3 local maxima above a threshold) are faces, so it finds any number of faces
  in an image of any size (multi-person scenes included). Trained on SynthFace renders (random crops, zoom,
  colour jitter, blur, noise).
* :class:`SyntheticLandmarker` — a small conv net on a square crop around a box that regresses the 68 landmarks
  (iBUG order, as the renderer's) and the head pose (pitch, yaw, roll).

They are learned models with measurable errors (reported by ``synthface.train_models``), not
oracles; exact values come only from a rendered image's sidecar JSON (``synthface.faces.backend``).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax.models import layers

from .recognizer import (
    ConvNet,
    augment_crops,
    batched_apply,
    box_matrices,
    fit,
    init_params,
    load_model,
    save_model,
    to_unit,
    warp_crops,
)

__all__ = ["DetectorConfig", "CenterNet", "SyntheticDetector", "train_detector", "LandmarkerConfig",
           "LandmarkNet", "SyntheticLandmarker", "train_landmarker", "box_iou", "detection_metrics"]

STRIDE = 8


# ------------------------------------------------------------------------------------------------- detector

@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    widths: tuple[int, ...] = (16, 32, 64, 64)   # stride 2, 4, 8, 16 stages
    head_width: int = 64
    tile: int = 64                # training crop side
    score_threshold: float = 0.3  # heatmap peak needed to report a face
    max_faces: int = 16

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if len(self.widths) != 4:
            raise ValueError(f"DetectorConfig.widths: expected 4 stage widths, got {self.widths}")
        if self.tile % 16:
            raise ValueError(f"DetectorConfig.tile must be a multiple of 16, got {self.tile}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d


class CenterNet(nn.Module):
    """``[B, H, W, 3]`` in ``[-1, 1]`` (H, W multiples of 16) → ``[B, H/8, W/8, 5]``: heat logit, log size (w, h
    in units of 8 px), centre offset (x, y) within the cell."""

    config: DetectorConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.config.widths

        def cbr(y, width, name, stride=1):
            y = layers.conv(width, 3, strides=stride, padding=1, name=f"{name}_conv")(y)
            return nn.relu(layers.group_norm(min(8, width), 1e-5, name=f"{name}_norm")(y))

        x = cbr(x, w[0], "s2", 2)
        x = cbr(x, w[1], "s4", 2)
        x = x + cbr(x, w[1], "s4b")
        x = cbr(x, w[2], "s8", 2)
        s8 = x + cbr(x, w[2], "s8b")
        x = cbr(s8, w[3], "s16", 2)
        x = x + cbr(x, w[3], "s16b")
        b, h, wd, c = x.shape
        up = jax.image.resize(x, (b, h * 2, wd * 2, c), "nearest")
        y = cbr(jnp.concatenate([s8, up], -1), self.config.head_width, "head")
        out = layers.conv(5, 1, name="out")(y)
        # start the heatmap at p ≈ 0.01 (focal-loss practice) so early training is not swamped by negatives
        return out.at[..., 0].add(-4.6)


def _pad_to(image: np.ndarray, multiple: int) -> np.ndarray:
    h, w = image.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="edge")
    return image


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[len(a), len(b)]`` of ``[x0, y0, x1, y1]`` boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), -1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), -1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


class SyntheticDetector:
    """Finds SynthFace faces: :meth:`detect` → ``(boxes [K, 4] as x0, y0, x1, y1, scores [K])``."""

    kind = "synthface-detector"

    def __init__(self, config: DetectorConfig, params, metrics: dict | None = None):
        self.config, self.params, self.metrics = config, params, dict(metrics or {})
        self.module = CenterNet(config)
        self._apply = jax.jit(lambda p, x: self.module.apply({"params": p}, x))

    def raw(self, image: np.ndarray) -> np.ndarray:
        """The net's output map ``[H/8, W/8, 5]`` for one RGB ``uint8`` image (edge-padded to a multiple of 64, so
        few input shapes get compiled; the padding's cells are cut off again)."""
        image = np.asarray(image)
        h, w = image.shape[:2]
        x = to_unit(_pad_to(image, 64)[None].astype(np.float32))
        return np.asarray(self._apply(self.params, x))[0, : -(-h // STRIDE), : -(-w // STRIDE)]

    def detect(self, image: np.ndarray, score_threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        thr = self.config.score_threshold if score_threshold is None else float(score_threshold)
        out = self.raw(image)
        heat = 1.0 / (1.0 + np.exp(-out[..., 0]))
        padded = np.pad(heat, 1, constant_values=-1.0)
        h, w = heat.shape
        neigh = np.max(np.stack([padded[i:i + h, j:j + w] for i in range(3) for j in range(3)]), 0)
        ys, xs = np.nonzero((heat >= neigh) & (heat >= thr))
        order = np.argsort(-heat[ys, xs])[: self.config.max_faces]
        ys, xs = ys[order], xs[order]
        size = np.exp(out[ys, xs, 1:3]) * STRIDE
        cx = (xs + out[ys, xs, 3]) * STRIDE - 0.5
        cy = (ys + out[ys, xs, 4]) * STRIDE - 0.5
        boxes = np.stack([cx - size[:, 0] / 2, cy - size[:, 1] / 2, cx + size[:, 0] / 2, cy + size[:, 1] / 2], -1)
        ih, iw = np.asarray(image).shape[:2]
        boxes = np.clip(boxes, [-0.5, -0.5, -0.5, -0.5], [iw - 0.5, ih - 0.5, iw - 0.5, ih - 0.5])
        return boxes.astype(np.float32), heat[ys, xs].astype(np.float32)

    def save(self, folder: str | os.PathLike) -> str:
        return save_model(folder, self.kind, self.config.to_dict(), self.params, {"metrics": self.metrics})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SyntheticDetector:
        config, params, meta = load_model(folder, cls.kind)
        return cls(DetectorConfig(**config), params, meta.get("metrics"))


def _targets(boxes_per_tile: Sequence[np.ndarray], tile: int) -> dict[str, np.ndarray]:
    g = tile // STRIDE
    n = len(boxes_per_tile)
    heat = np.zeros((n, g, g), np.float32)
    reg = np.zeros((n, g, g, 4), np.float32)
    mask = np.zeros((n, g, g), np.float32)
    yy, xx = np.mgrid[0:g, 0:g] + 0.5
    for i, boxes in enumerate(boxes_per_tile):
        for x0, y0, x1, y1 in boxes:
            gx, gy = ((x0 + x1) / 2 + 0.5) / STRIDE, ((y0 + y1) / 2 + 0.5) / STRIDE
            if not (0 <= gx < g and 0 <= gy < g):
                continue
            bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
            sigma = max(0.35, 0.12 * max(bw, bh) / STRIDE)
            heat[i] = np.maximum(heat[i], np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * sigma ** 2)))
            cx, cy = int(gx), int(gy)
            heat[i, cy, cx] = 1.0
            reg[i, cy, cx] = [np.log(bw / STRIDE), np.log(bh / STRIDE), gx - cx, gy - cy]
            mask[i, cy, cx] = 1.0
    return {"heat": heat, "reg": reg, "mask": mask}


def _detector_loss(out: jax.Array, heat: jax.Array, reg: jax.Array, mask: jax.Array):
    """CenterNet's penalty-reduced focal loss on the heatmap + L1 on size and offset at the centres."""
    p = jnp.clip(jax.nn.sigmoid(out[..., 0]), 1e-4, 1 - 1e-4)
    pos = (heat >= 1.0).astype(jnp.float32)
    focal = -(pos * (1 - p) ** 2 * jnp.log(p) + (1 - pos) * (1 - heat) ** 4 * p ** 2 * jnp.log(1 - p))
    npos = jnp.maximum(pos.sum(), 1.0)
    l1 = jnp.sum(jnp.abs(out[..., 1:] - reg) * mask[..., None]) / npos
    return focal.sum() / npos + l1, l1


def train_detector(canvases: np.ndarray, boxes: Sequence[np.ndarray], config: DetectorConfig = DetectorConfig(), *,
                   steps: int = 500, batch_size: int = 32, learning_rate: float = 2e-3, zoom: tuple = (0.75, 1.3),
                   seed: int = 0, progress: bool = True) -> SyntheticDetector:
    """Train on ``canvases`` (``uint8 [N, H, W, 3]``) with their face boxes (``boxes[i]``: ``[k, 4]`` pixels).

    Every step takes random ``tile``² windows (zoom ``zoom``, edge-replicated borders) plus colour / blur / noise
    augmentation; a face is a positive when its centre falls inside the window.
    """
    canvases = np.asarray(canvases)
    if canvases.ndim != 4 or len(canvases) != len(boxes):
        raise ValueError(f"train_detector: canvases {canvases.shape} and {len(boxes)} box lists must agree")
    boxes = [np.asarray(b, np.float64).reshape(-1, 4) for b in boxes]
    t = config.tile
    _, h, w, _ = canvases.shape
    module = CenterNet(config)
    params = init_params(module, jnp.zeros((1, t, t, 3)), seed)

    def sample(rng):
        idx = rng.integers(0, len(canvases), batch_size)
        k = rng.uniform(*zoom, batch_size)          # output pixels per canvas pixel
        side = t / k
        x0 = rng.uniform(-0.15 * side, np.maximum(w - 0.85 * side, -0.15 * side + 1))
        y0 = rng.uniform(-0.1 * side, np.maximum(h - 0.9 * side, -0.1 * side + 1))
        m = np.zeros((batch_size, 2, 3))
        m[:, 0, 0] = m[:, 1, 1] = k
        m[:, 0, 2], m[:, 1, 2] = -x0 * k, -y0 * k
        tiles = warp_crops(canvases[idx], m, t, border="edge")
        tb = [boxes[i] * k[j] - np.array([x0[j], y0[j], x0[j], y0[j]]) * k[j] for j, i in enumerate(idx)]
        tgt = _targets(tb, t)
        return to_unit(augment_crops(rng, tiles)), tgt["heat"], tgt["reg"], tgt["mask"]

    def loss_fn(p, batch):
        x, heat, reg, mask = batch
        return _detector_loss(module.apply({"params": p}, x), heat, reg, mask)

    params, losses = fit(loss_fn, params, sample, steps=steps, learning_rate=learning_rate, seed=seed,
                         desc="detector", progress=progress)
    return SyntheticDetector(config, params, {"final_loss": float(losses[-10:].mean()), "steps": int(steps)})


def detection_metrics(detector: SyntheticDetector, images: Sequence[np.ndarray],
                      true_boxes: Sequence[np.ndarray], iou: float = 0.5) -> dict[str, float]:
    """Recall / precision at an IoU threshold and the mean IoU of matched faces (greedy matching by score)."""
    tp = fp = fn = 0
    ious = []
    for image, gt in zip(images, true_boxes):
        pred, _ = detector.detect(image)
        gt = np.asarray(gt, np.float64).reshape(-1, 4)
        m = box_iou(pred, gt) if len(pred) and len(gt) else np.zeros((len(pred), len(gt)))
        used = set()
        for i in range(len(pred)):
            j = int(np.argmax(m[i])) if m.shape[1] else -1
            if j >= 0 and m[i, j] >= iou and j not in used:
                used.add(j)
                tp += 1
                ious.append(m[i, j])
            else:
                fp += 1
        fn += len(gt) - len(used)
    return {"recall": tp / max(tp + fn, 1), "precision": tp / max(tp + fp, 1),
            "mean_iou": float(np.mean(ious)) if ious else 0.0, "faces": tp + fn}


# ------------------------------------------------------------------------------------------------- landmarks

@dataclasses.dataclass(frozen=True)
class LandmarkerConfig:
    crop_size: int = 40
    expand: float = 1.3          # crop side = expand · max(box w, h)
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: int = 0
    hidden: int = 256
    num_landmarks: int = 68

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d


class LandmarkNet(nn.Module):
    """Crop → ``[B, 2·N + 3]``: landmark coordinates / crop size, then (pitch, yaw, roll) / 60°."""

    config: LandmarkerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ConvNet(self.config.widths, self.config.blocks, name="backbone")(x)
        x = nn.relu(layers.dense(self.config.hidden, name="hidden")(x.reshape(x.shape[0], -1)))
        return layers.dense(2 * self.config.num_landmarks + 3, name="out")(x)


class SyntheticLandmarker:
    """:meth:`predict` → landmarks ``[B, N, 2]`` (image pixels) and poses ``[B, 3]`` (degrees) for given boxes."""

    kind = "synthface-landmarker"

    def __init__(self, config: LandmarkerConfig, params, metrics: dict | None = None):
        self.config, self.params, self.metrics = config, params, dict(metrics or {})
        self.module = LandmarkNet(config)
        self._apply = jax.jit(lambda p, x: self.module.apply({"params": p}, x))

    def predict(self, images, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``images``: one image per box (``[B, H, W, 3]`` or a list); ``boxes`` ``[B, 4]`` pixels."""
        c = self.config
        m = box_matrices(boxes, c.crop_size, c.expand)
        if len(m) == 0:
            return np.zeros((0, c.num_landmarks, 2), np.float32), np.zeros((0, 3), np.float32)
        out = batched_apply(self._apply, self.params, to_unit(warp_crops(images, m, c.crop_size))).astype(np.float64)
        n = c.num_landmarks
        pts = out[:, : 2 * n].reshape(-1, n, 2) * c.crop_size
        # crop → image: invert the crop's scale-and-shift
        k = m[:, 0, 0][:, None, None]
        pts = (pts - m[:, None, :, 2]) / k
        return pts.astype(np.float32), (out[:, 2 * n:] * 60.0).astype(np.float32)

    def save(self, folder: str | os.PathLike) -> str:
        return save_model(folder, self.kind, self.config.to_dict(), self.params, {"metrics": self.metrics})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SyntheticLandmarker:
        config, params, meta = load_model(folder, cls.kind)
        return cls(LandmarkerConfig(**config), params, meta.get("metrics"))


def train_landmarker(images: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray, poses: np.ndarray,
                     config: LandmarkerConfig = LandmarkerConfig(), *, steps: int = 500, batch_size: int = 64,
                     learning_rate: float = 2e-3, box_jitter: float = 0.08, seed: int = 0,
                     progress: bool = True) -> SyntheticLandmarker:
    """Train on single faces: ``images [N, H, W, 3]``, true ``boxes [N, 4]``, ``landmarks [N, 68, 2]`` and
    ``poses [N, 3]``. Boxes are jittered (shift and scale by up to ``box_jitter``) to cover detector error."""
    images = np.asarray(images)
    boxes = np.asarray(boxes, np.float64)
    landmarks = np.asarray(landmarks, np.float64)
    poses = np.asarray(poses, np.float64)
    if not (len(images) == len(boxes) == len(landmarks) == len(poses)):
        raise ValueError("train_landmarker: images, boxes, landmarks and poses must have the same length")
    if landmarks.shape[1:] != (config.num_landmarks, 2):
        raise ValueError(f"landmarks: expected [N, {config.num_landmarks}, 2], got {landmarks.shape}")
    c = config
    module = LandmarkNet(c)
    params = init_params(module, jnp.zeros((1, c.crop_size, c.crop_size, 3)), seed)
    # start from the mean shape (in crop coordinates of the true boxes)
    m0 = box_matrices(boxes, c.crop_size, c.expand)
    local = (landmarks * m0[:, None, 0, 0, None] + m0[:, None, :, 2]) / c.crop_size
    bias = np.concatenate([local.mean(0).reshape(-1), (poses / 60.0).mean(0)])
    params["out"]["bias"] = jnp.asarray(bias, jnp.float32)
    params["out"]["kernel"] = params["out"]["kernel"] * 0.1

    def sample(rng):
        idx = rng.integers(0, len(images), batch_size)
        b = boxes[idx]
        size = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])[:, None]
        centre = (b[:, :2] + b[:, 2:]) / 2 + rng.uniform(-box_jitter, box_jitter, (batch_size, 2)) * size
        half = (b[:, 2:] - b[:, :2]) / 2 * rng.uniform(1 - box_jitter, 1 + box_jitter, (batch_size, 1))
        jb = np.concatenate([centre - half, centre + half], 1)
        m = box_matrices(jb, c.crop_size, c.expand)
        crops = warp_crops(images[idx], m, c.crop_size)
        tgt = (landmarks[idx] * m[:, None, 0, 0, None] + m[:, None, :, 2]) / c.crop_size
        y = np.concatenate([tgt.reshape(batch_size, -1), poses[idx] / 60.0], 1).astype(np.float32)
        return to_unit(augment_crops(rng, crops)), y

    def loss_fn(p, batch):
        x, y = batch
        out = module.apply({"params": p}, x)
        n2 = 2 * c.num_landmarks
        lmk = jnp.mean(jnp.abs(out[:, :n2] - y[:, :n2]))
        return lmk + 0.2 * jnp.mean(jnp.abs(out[:, n2:] - y[:, n2:])), lmk

    params, losses = fit(loss_fn, params, sample, steps=steps, learning_rate=learning_rate, seed=seed,
                         desc="landmarker", progress=progress)
    return SyntheticLandmarker(c, params, {"final_loss": float(losses[-10:].mean()), "steps": int(steps)})
