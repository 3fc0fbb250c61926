"""SynthFace's "ArcFace": a small JAX face recogniser trained with an additive angular margin loss.

In the SynthFace world (``synthface``) this network plays the part insightface's ArcFace plays for
real photos: the identity vector the ID encoder reads. It sees a face aligned by its 5 keypoints onto the ArcFace
template scaled to ``crop_size`` (32 px for 64-px images), runs a small conv net and returns an L2-normalised
embedding. Training (``train_recognizer``) uses ArcFace's loss — ``s · cos(θ_y + m)`` for the true class —
with random alignment jitter, colour jitter, blur and noise, so embeddings stay stable on generated images.

Also here, shared by the other SynthFace networks (``synthface.faces.detector``, ``synthface.evaluation.classifiers``):
:class:`ConvNet` (a small GroupNorm conv net built from ``models.layers``), :func:`warp_crops` (batched bilinear
affine crops, numpy), :func:`box_matrices` / :func:`alignment_matrices`, :func:`fit` (an AdamW loop with a tqdm
bar), :func:`save_model` / :func:`load_model` (``params.safetensors`` + ``config.json``) and the augmentation.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax.models import layers
from dynamicid_jax.weights.keymap import read_safetensors, write_safetensors

from dynamicid_jax.faces import ARCFACE_TEMPLATE, similarity_transform

__all__ = [
    "ConvNet", "warp_crops", "box_matrices", "alignment_matrices", "jitter_matrices", "augment_crops",
    "to_unit", "batched_apply", "init_params", "fit", "save_model", "load_model", "RecognizerConfig",
    "FaceEmbedder", "SyntheticRecognizer", "train_recognizer", "arcface_loss", "verification_metrics",
    "identification_accuracy",
]


# ---------------------------------------------------------------------------------------------- crops

def alignment_matrices(kps: np.ndarray, size: int) -> np.ndarray:
    """``[B, 2, 3]`` similarities taking each face's 5 keypoints onto the ArcFace template scaled to ``size``."""
    kps = np.asarray(kps, np.float64)
    if kps.ndim == 2:
        kps = kps[None]
    if kps.ndim != 3 or kps.shape[1:] != (5, 2):
        raise ValueError(f"kps: expected [B, 5, 2] keypoints, got shape {kps.shape}")
    template = ARCFACE_TEMPLATE * (size / 112.0)
    return np.stack([similarity_transform(k, template) for k in kps])


def box_matrices(boxes: np.ndarray, size: int, expand: float = 1.3) -> np.ndarray:
    """``[B, 2, 3]`` maps taking a square of side ``expand · max(w, h)`` centred on each ``[x0, y0, x1, y1]`` box
    onto a ``size``² crop (pixel centres at integers on both sides)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    side = np.maximum(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]), 1.0) * expand
    k = size / side
    m = np.zeros((len(boxes), 2, 3))
    m[:, 0, 0] = m[:, 1, 1] = k
    m[:, 0, 2] = -(cx - side / 2) * k - 0.5
    m[:, 1, 2] = -(cy - side / 2) * k - 0.5
    return m


def warp_crops(images: np.ndarray | Sequence[np.ndarray], matrices: np.ndarray, size: int,
               border: str = "zero") -> np.ndarray:
    """Bilinear affine crops → float32 ``[B, size, size, 3]`` in ``[0, 255]``.

    ``matrices[b]`` maps image pixel coordinates to crop coordinates (as ``cv2.warpAffine``'s matrix);
    ``images`` is ``uint8 [B, H, W, 3]`` or a list of ``[H, W, 3]`` arrays of any sizes. Outside the image:
    black (``border="zero"``) or the nearest edge pixel (``"edge"``).
    """
    if border not in ("zero", "edge"):
        raise ValueError(f"border must be 'zero' or 'edge', got {border!r}")
    matrices = np.asarray(matrices, np.float64).reshape(-1, 2, 3)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if len(images) != len(matrices):
            raise ValueError(f"warp_crops: {len(images)} images but {len(matrices)} matrices")
        return _warp_same_size(images, matrices, size, border)
    images = list(images)
    if len(images) != len(matrices):
        raise ValueError(f"warp_crops: {len(images)} images but {len(matrices)} matrices")
    if not images:
        return np.zeros((0, size, size, 3), np.float32)
    return np.concatenate([_warp_same_size(np.asarray(im)[None], m[None], size, border)
                           for im, m in zip(images, matrices)])


def _warp_same_size(images: np.ndarray, matrices: np.ndarray, size: int, border: str) -> np.ndarray:
    b, h, w, _ = images.shape
    full = np.concatenate([matrices, np.tile([[[0.0, 0.0, 1.0]]], (b, 1, 1))], 1)
    inv = np.linalg.inv(full)[:, :2]  # crop → image
    jj, ii = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    sx = inv[:, 0, 0, None, None] * jj + inv[:, 0, 1, None, None] * ii + inv[:, 0, 2, None, None]
    sy = inv[:, 1, 0, None, None] * jj + inv[:, 1, 1, None, None] * ii + inv[:, 1, 2, None, None]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    bi = np.arange(b)[:, None, None]
    out = np.zeros((b, size, size, 3), np.float64)
    for dy, dx, wgt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        xs, ys = x0 + dx, y0 + dy
        valid = ((xs >= 0) & (xs < w) & (ys >= 0) & (ys < h))[..., None] if border == "zero" else 1.0
        px = images[bi, np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)].astype(np.float64)
        out += wgt * valid * px
    return out.astype(np.float32)


def batched_apply(fn: Callable, params, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``fn(params, x)`` over ``x`` in chunks, each zero-padded to a power of two (≥ 8) so a jitted ``fn`` compiles
    for a handful of shapes only, whatever the number of faces."""
    out = []
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        n = len(chunk)
        padded = max(8, 1 << (n - 1).bit_length())
        if padded != n:
            chunk = np.concatenate([chunk, np.zeros((padded - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(fn(params, chunk))[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def to_unit(crops: np.ndarray) -> np.ndarray:
    """``[0, 255]`` crops → the networks' input range ``[-1, 1]``."""
    return (np.asarray(crops, np.float32) / 127.5 - 1.0).astype(np.float32)


def jitter_matrices(rng: np.random.Generator, matrices: np.ndarray, size: int, rotate: float = 8.0,
                    scale: float = 0.07, shift: float = 0.06) -> np.ndarray:
    """Compose random similarities about the crop centre (degrees, relative scale, shift as a fraction of size)."""
    n = len(matrices)
    ang = np.radians(rng.uniform(-rotate, rotate, n))
    k = rng.uniform(1 - scale, 1 + scale, n)
    t = rng.uniform(-shift, shift, (n, 2)) * size
    c = (size - 1) / 2.0
    a = np.zeros((n, 3, 3))
    a[:, 0, 0], a[:, 0, 1] = k * np.cos(ang), -k * np.sin(ang)
    a[:, 1, 0], a[:, 1, 1] = k * np.sin(ang), k * np.cos(ang)
    a[:, :2, 2] = c - np.einsum("nij,j->ni", a[:, :2, :2], np.array([c, c])) + t
    a[:, 2, 2] = 1.0
    full = np.concatenate([matrices, np.tile([[[0.0, 0.0, 1.0]]], (n, 1, 1))], 1)
    return (a @ full)[:, :2]


def augment_crops(rng: np.random.Generator, crops: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Colour jitter, occasional blur and noise on ``[B, S, S, 3]`` crops in ``[0, 255]`` (what generated images
    differ by); returns float32 in ``[0, 255]``."""
    x = np.asarray(crops, np.float32)
    n = len(x)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    contrast = rng.uniform(1 - 0.15 * strength, 1 + 0.15 * strength, (n, 1, 1, 1)).astype(np.float32)
    gain = rng.uniform(1 - 0.06 * strength, 1 + 0.06 * strength, (n, 1, 1, 3)).astype(np.float32)
    bright = rng.uniform(-12 * strength, 12 * strength, (n, 1, 1, 1)).astype(np.float32)
    x = (x - mean) * contrast + mean
    x = x * gain + bright
    blur = rng.uniform(size=n) < 0.3 * strength
    if blur.any():
        pad = np.pad(x[blur], ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        s = x.shape[1]
        x[blur] = sum(pad[:, i:i + s, j:j + s] for i in range(3) for j in range(3)) / 9.0
    x = x + rng.normal(0, 3.0 * strength, x.shape).astype(np.float32)
    return np.clip(x, 0, 255)


# ---------------------------------------------------------------------------------------------- network

class ConvNet(nn.Module):
    """Conv 3×3 stem (``widths[0]``), then per further stage a stride-2 conv and ``blocks`` residual 3×3 convs
    (none at full resolution, where they would cost the most); GroupNorm + ReLU after every conv.

    Returns the last feature map ``[B, S/2^(n−1), S/2^(n−1), widths[-1]]``.
    """

    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: int = 1
    groups: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def cbr(y, width, name, stride=1):
            y = layers.conv(width, 3, strides=stride, padding=1, name=f"{name}_conv", dtype=self.dtype)(y)
            y = layers.group_norm(min(self.groups, width), 1e-5, name=f"{name}_norm")(y)
            return nn.relu(y)

        x = cbr(x.astype(self.dtype), self.widths[0], "stem")
        for i, width in enumerate(self.widths):
            if i == 0:
                continue
            x = cbr(x, width, f"down_{i}", stride=2)
            for j in range(self.blocks):
                x = x + cbr(x, width, f"block_{i}_{j}")
        return x


def init_params(module: nn.Module, example: jax.Array, seed: int = 0) -> dict:
    """Fresh params for ``module`` drawn in numpy from the abstract shapes (``jax.eval_shape``).

    Same distributions as the ``layers`` initialisers (kernels: LeCun-normal truncated at 2σ; biases 0; norm
    scales 1) without compiling the RNG-heavy Flax ``init`` — on a CPU that compile alone takes seconds per model.
    """
    abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), example)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = leaf.shape
        if name == "kernel":
            std = 1.0 / np.sqrt(max(int(np.prod(shape[:-1])), 1)) / 0.87962566103423978  # truncation correction
            w = rng.standard_normal(shape)
            bad = np.abs(w) > 2.0
            while bad.any():
                w[bad] = rng.standard_normal(int(bad.sum()))
                bad = np.abs(w) > 2.0
            return jnp.asarray(w * std, jnp.float32)
        if name == "scale":
            return jnp.ones(shape, jnp.float32)
        return jnp.zeros(shape, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


# ---------------------------------------------------------------------------------------------- training

def fit(loss_fn: Callable, params, sample_batch: Callable[[np.random.Generator], Any], *, steps: int,
        learning_rate: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0, desc: str = "train",
        progress: bool = True, warmup: int | None = None):
    """Minimise ``loss_fn(params, batch) -> (loss, aux)`` with AdamW (warm-up + cosine decay), one jitted
    step per batch from ``sample_batch(np_rng)``. Returns ``(params, losses)`` (losses every step, numpy)."""
    import optax
    from tqdm import tqdm

    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    warmup = max(1, min(int(steps) // 10, 100)) if warmup is None else warmup
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, int(steps), learning_rate * 0.02)
    opt = optax.chain(optax.clip_by_global_norm(5.0), optax.adamw(schedule, weight_decay=weight_decay))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    np_rng = np.random.default_rng(seed)
    losses = []
    bar = tqdm(range(int(steps)), desc=desc, disable=not progress, leave=False)
    # the next batch is prepared (numpy, releases the GIL) while the current step runs
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(sample_batch, np_rng)
        for i in bar:
            batch = pending.result()
            if i + 1 < steps:
                pending = pool.submit(sample_batch, np_rng)
            params, opt_state, loss = step(params, opt_state, batch)
            losses.append(loss)
            if progress and (i % 20 == 0 or i == steps - 1):
                bar.set_postfix(loss=f"{float(loss):.4f}")
    return params, np.asarray(jax.device_get(losses), np.float32)


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = np.asarray(v, np.float32)
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, v in flat.items():
        node = tree
        *path, leaf = name.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(v)
    return tree


def save_model(folder: str | os.PathLike, kind: str, config: dict, params, extra: dict | None = None) -> str:
    """Write ``folder/params.safetensors`` and ``folder/config.json`` (``{"kind", "config", **extra}``)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    write_safetensors(_flatten(jax.device_get(params)), os.path.join(folder, "params.safetensors"),
                      metadata={"kind": kind})
    meta = {"kind": kind, "config": config, **(extra or {})}
    from dynamicid_jax.file_io import write_json

    write_json(meta, os.path.join(folder, "config.json"), indent=1, sort_keys=True)
    return folder


def load_model(folder: str | os.PathLike, kind: str) -> tuple[dict, dict, dict]:
    """Read a folder written by :func:`save_model` → ``(config, params, meta)``; checks ``kind``."""
    folder = os.fspath(folder)
    cfg_path, w_path = os.path.join(folder, "config.json"), os.path.join(folder, "params.safetensors")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{kind} model folder {folder!r} lacks {os.path.basename(p)}")
    with open(cfg_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("kind") != kind:
        raise ValueError(f"{folder!r} holds a {meta.get('kind')!r} model, expected {kind!r}")
    return meta["config"], _unflatten(read_safetensors(w_path)), meta


# ---------------------------------------------------------------------------------------------- recogniser

@dataclasses.dataclass(frozen=True)
class RecognizerConfig:
    """Architecture and loss of a SynthFace recogniser."""

    crop_size: int = 32
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: int = 0
    embed_dim: int = 128
    margin: float = 0.3       # ArcFace additive angular margin (radians)
    scale: float = 16.0       # ArcFace logit scale

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.crop_size % 2 ** (len(self.widths) - 1):
            raise ValueError(f"crop_size {self.crop_size} must be divisible by {2 ** (len(self.widths) - 1)}")
        if self.embed_dim < 2 or not 0 <= self.margin < 1.5 or self.scale <= 0:
            raise ValueError(f"RecognizerConfig: bad embed_dim / margin / scale in {self}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d


class FaceEmbedder(nn.Module):
    """ConvNet → flatten → Dense(embed_dim); the caller L2-normalises."""

    config: RecognizerConfig

    @nn.compact
    def __call__(self, crops: jax.Array) -> jax.Array:
        x = ConvNet(self.config.widths, self.config.blocks, name="backbone")(crops)
        x = x.reshape(x.shape[0], -1)
        x = layers.layer_norm(1e-5, name="feature_norm")(x)
        return layers.dense(self.config.embed_dim, name="embedding")(x)


def _l2n(x, axis=-1):
    return x / jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True) + 1e-12)


def arcface_loss(embeddings: jax.Array, class_weights: jax.Array, labels: jax.Array, margin: float, scale: float):
    """ArcFace: cross-entropy over ``s·cos θ_j`` with the true class's logit ``s·cos(θ_y + m)`` (the usual
    fallback ``cos θ − m·sin m`` where ``θ + m > π``). Returns ``(loss, accuracy)``."""
    cos = _l2n(embeddings) @ _l2n(class_weights, axis=0)
    sin = jnp.sqrt(jnp.clip(1.0 - cos ** 2, 1e-7, 1.0))
    cos_m = cos * np.cos(margin) - sin * np.sin(margin)
    cos_m = jnp.where(cos > np.cos(np.pi - margin), cos_m, cos - margin * np.sin(margin))
    onehot = jax.nn.one_hot(labels, cos.shape[-1])
    logits = scale * jnp.where(onehot > 0, cos_m, cos)
    loss = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1))
    return loss, jnp.mean(jnp.argmax(cos, -1) == labels)


class SyntheticRecognizer:
    """A trained recogniser: :meth:`embed` (images + keypoints) / :meth:`embed_crops` → L2-normalised ``[B, D]``."""

    kind = "synthface-recognizer"

    def __init__(self, config: RecognizerConfig, params, metrics: dict | None = None):
        self.config = config
        self.params = params
        self.metrics = dict(metrics or {})
        self.module = FaceEmbedder(config)
        self._apply = jax.jit(lambda p, x: _l2n(self.module.apply({"params": p}, x)))

    @property
    def embedding_dim(self) -> int:
        return self.config.embed_dim

    def crops(self, images, kps) -> np.ndarray:
        """ArcFace-aligned crops ``[B, S, S, 3]`` in ``[0, 255]`` from images and ``[B, 5, 2]`` keypoints."""
        kps = np.asarray(kps, np.float64).reshape(-1, 5, 2)
        return warp_crops(images, alignment_matrices(kps, self.config.crop_size), self.config.crop_size)

    def embed_crops(self, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
        crops = np.asarray(crops, np.float32)
        if crops.ndim != 4 or crops.shape[1:] != (self.config.crop_size, self.config.crop_size, 3):
            raise ValueError(f"crops: expected [B, {self.config.crop_size}, {self.config.crop_size}, 3], "
                             f"got {crops.shape}")
        if len(crops) == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        return batched_apply(self._apply, self.params, to_unit(crops), batch_size)

    def embed(self, images, kps) -> np.ndarray:
        """Embeddings of the faces given by ``kps`` (``[B, 5, 2]``) in ``images`` (``[B, H, W, 3]`` or a list)."""
        return self.embed_crops(self.crops(images, kps))

    def save(self, folder: str | os.PathLike) -> str:
        return save_model(folder, self.kind, self.config.to_dict(), self.params, {"metrics": self.metrics})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SyntheticRecognizer:
        config, params, meta = load_model(folder, cls.kind)
        return cls(RecognizerConfig(**config), params, meta.get("metrics"))


def train_recognizer(images: np.ndarray, kps: np.ndarray, labels: np.ndarray,
                     config: RecognizerConfig = RecognizerConfig(), *, steps: int = 600, batch_size: int = 64,
                     learning_rate: float = 2e-3, seed: int = 0, progress: bool = True) -> SyntheticRecognizer:
    """Train with the ArcFace loss on faces ``images[i]`` (``uint8 [N, H, W, 3]``, one face each, keypoints
    ``kps[i]``) of identity ``labels[i]`` (ints ``0..C−1``). Alignment is re-jittered every step."""
    images = np.asarray(images)
    labels = np.asarray(labels, np.int64)
    if images.ndim != 4 or len(images) != len(labels) or len(kps) != len(labels):
        raise ValueError(f"train_recognizer: images {images.shape}, kps {np.shape(kps)} and labels "
                         f"{labels.shape} must agree on N")
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise ValueError("train_recognizer needs at least 2 identities")
    size = config.crop_size
    base = alignment_matrices(kps, size)
    module = FaceEmbedder(config)
    params = {"net": init_params(module, jnp.zeros((1, size, size, 3)), seed),
              "classes": jnp.asarray(np.random.default_rng(seed + 1).normal(0, 0.1, (config.embed_dim, num_classes)),
                                     jnp.float32)}

    def sample(rng):
        idx = rng.integers(0, len(images), batch_size)
        crops = warp_crops(images[idx], jitter_matrices(rng, base[idx], size), size)
        return to_unit(augment_crops(rng, crops)), labels[idx]

    def loss_fn(p, batch):
        x, y = batch
        return arcface_loss(module.apply({"params": p["net"]}, x), p["classes"], y, config.margin, config.scale)

    params, losses = fit(loss_fn, params, sample, steps=steps, learning_rate=learning_rate, seed=seed,
                         desc="recogniser (ArcFace)", progress=progress)
    return SyntheticRecognizer(config, params["net"], {"final_loss": float(losses[-10:].mean()),
                                                       "steps": int(steps), "identities": num_classes})


# ---------------------------------------------------------------------------------------------- metrics

def verification_metrics(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Face verification over all pairs: ROC AUC of the cosine, accuracy at the best threshold, mean cosines."""
    e = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels)
    iu = np.triu_indices(len(e), 1)
    scores = (e @ e.T)[iu]
    same = (labels[:, None] == labels[None, :])[iu]
    if same.all() or not same.any():
        raise ValueError("verification needs both same-identity and different-identity pairs")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # average ranks over ties
    uniq, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    if len(uniq) < len(scores):
        ranks = (np.bincount(inv, ranks) / counts)[inv]
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    auc = (ranks[same].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    s_sorted, y_sorted = scores[order], same[order]
    # threshold between consecutive sorted scores: predict "same" for scores above it
    neg_below = np.concatenate([[0], np.cumsum(~y_sorted)])
    pos_above = n_pos - np.concatenate([[0], np.cumsum(y_sorted)])
    acc = (neg_below + pos_above) / len(scores)
    best = int(np.argmax(acc))
    thr = float(s_sorted[best - 1] if best > 0 else s_sorted[0] - 1e-6)
    return {"auc": float(auc), "accuracy": float(acc[best]), "threshold": thr,
            "mean_same": float(scores[same].mean()), "mean_different": float(scores[~same].mean()),
            "pairs": int(len(scores))}


def identification_accuracy(gallery: np.ndarray, gallery_labels: np.ndarray, probes: np.ndarray,
                            probe_labels: np.ndarray) -> float:
    """Top-1 accuracy of nearest-gallery (cosine) identification."""
    sims = np.asarray(probes) @ np.asarray(gallery).T
    return float(np.mean(np.asarray(gallery_labels)[np.argmax(sims, 1)] == np.asarray(probe_labels)))
