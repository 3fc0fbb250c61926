"""Evaluation-only SynthFace models: a second recogniser and multi-head attribute classifiers.

docs/method.md §9 measures generated images with models *different from the ones the method consumes*:

* :func:`train_eval_recognizer` — a recogniser with another architecture (3 stages with residual blocks, 96-d) and
  another seed than the input "ArcFace" (``synthface.faces.recognizer``); FaceSim uses it.
* :class:`AttributeClassifier` — one small conv net with several softmax heads. Two kinds are trained by
  ``synthface.train_models``:

  - ``input="face"``: a square crop around the face box → heads ``expression`` (7) and ``pose`` (5) — the
    Expr / Pose accuracies;
  - ``input="region"``: a region of the image (the whole image, or one person's layout strip) resized to a square
    → heads ``background``, ``clothing``, ``placement`` — prompt alignment on SynthFace (are the attributes the
    prompt names in the picture?).

Label names travel with the saved model (``config.json``), so this module knows nothing about SynthFace's
vocabulary.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthface.faces.recognizer import (
    ConvNet,
    RecognizerConfig,
    SyntheticRecognizer,
    augment_crops,
    batched_apply,
    box_matrices,
    fit,
    init_params,
    jitter_matrices,
    load_model,
    save_model,
    to_unit,
    train_recognizer,
    warp_crops,
)
from dynamicid_jax.models import layers

__all__ = ["EVAL_RECOGNIZER_CONFIG", "train_eval_recognizer", "ClassifierConfig", "MultiHeadNet",
           "AttributeClassifier", "train_classifier", "region_matrices", "EvalModels", "load_eval_models"]

#: the evaluation recogniser: a different architecture from the input recogniser's default
EVAL_RECOGNIZER_CONFIG = RecognizerConfig(crop_size=32, widths=(16, 32, 64), blocks=1, embed_dim=96, margin=0.35,
                                          scale=20.0)


def train_eval_recognizer(images: np.ndarray, kps: np.ndarray, labels: np.ndarray, *, steps: int = 500,
                          batch_size: int = 64, seed: int = 1, progress: bool = True) -> SyntheticRecognizer:
    """The second, independently trained recogniser (``EVAL_RECOGNIZER_CONFIG``, seed 1 by default)."""
    return train_recognizer(images, kps, labels, EVAL_RECOGNIZER_CONFIG, steps=steps, batch_size=batch_size,
                            seed=seed, progress=progress)


def region_matrices(regions: np.ndarray, size: int) -> np.ndarray:
    """``[B, 2, 3]`` maps stretching each ``[x0, y0, x1, y1]`` region (pixel edges) onto a ``size``² crop."""
    r = np.asarray(regions, np.float64).reshape(-1, 4)
    kx = size / np.maximum(r[:, 2] - r[:, 0], 1e-6)
    ky = size / np.maximum(r[:, 3] - r[:, 1], 1e-6)
    m = np.zeros((len(r), 2, 3))
    m[:, 0, 0], m[:, 1, 1] = kx, ky
    m[:, 0, 2], m[:, 1, 2] = -r[:, 0] * kx - 0.5, -r[:, 1] * ky - 0.5
    return m


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """``input``: ``"face"`` (square crop of ``expand`` × the face box) or ``"region"`` (a region stretched to
    a square). ``heads``: ``((name, (label, ...)), ...)`` in output order."""

    heads: tuple[tuple[str, tuple[str, ...]], ...]
    input: str = "face"
    crop_size: int = 40
    expand: float = 1.3
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: int = 0
    hidden: int = 128

    def __post_init__(self):
        heads = tuple((str(n), tuple(str(v) for v in labels)) for n, labels in self.heads)
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.input not in ("face", "region"):
            raise ValueError(f"ClassifierConfig.input must be 'face' or 'region', got {self.input!r}")
        if not heads or any(len(labels) < 2 for _, labels in heads):
            raise ValueError(f"ClassifierConfig.heads: need at least one head with >= 2 labels, got {heads}")

    @property
    def head_names(self) -> list[str]:
        return [n for n, _ in self.heads]

    def labels(self, head: str) -> tuple[str, ...]:
        for n, labels in self.heads:
            if n == head:
                return labels
        raise KeyError(f"no head {head!r}; heads: {self.head_names}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["heads"] = [[n, list(v)] for n, v in self.heads]
        d["widths"] = list(self.widths)
        return d


class MultiHeadNet(nn.Module):
    """ConvNet → Dense(hidden) → ReLU → one Dense per head; logits concatenated in head order."""

    config: ClassifierConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ConvNet(self.config.widths, self.config.blocks, name="backbone")(x)
        x = nn.relu(layers.dense(self.config.hidden, name="hidden")(x.reshape(x.shape[0], -1)))
        return jnp.concatenate([layers.dense(len(labels), name=f"head_{name}")(x)
                                for name, labels in self.config.heads], -1)


class AttributeClassifier:
    """A trained multi-head classifier: :meth:`probabilities` / :meth:`predict` on images + boxes / regions."""

    kind = "synthface-classifier"

    def __init__(self, config: ClassifierConfig, params, metrics: dict | None = None):
        self.config, self.params, self.metrics = config, params, dict(metrics or {})
        self.module = MultiHeadNet(config)
        self._apply = jax.jit(lambda p, x: self.module.apply({"params": p}, x))

    def matrices(self, images, boxes: np.ndarray | None) -> np.ndarray:
        c = self.config
        if c.input == "face":
            if boxes is None:
                raise ValueError("a face classifier needs the face boxes ([B, 4] pixels)")
            return box_matrices(boxes, c.crop_size, c.expand)
        if boxes is None:  # the whole image
            boxes = [[-0.5, -0.5, im.shape[1] - 0.5, im.shape[0] - 0.5] for im in images]
        return region_matrices(boxes, c.crop_size)

    def crops(self, images, boxes: np.ndarray | None = None) -> np.ndarray:
        images = list(images) if not (isinstance(images, np.ndarray) and images.ndim == 4) else images
        return warp_crops(images, self.matrices(images, boxes), self.config.crop_size, border="edge")

    def logits(self, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, sum(len(v) for _, v in self.config.heads)), np.float32)
        return batched_apply(self._apply, self.params, to_unit(crops), batch_size)

    def probabilities(self, images, boxes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``{head: [B, C]}`` softmax probabilities; ``images``: ``[B, H, W, 3]`` or a list (one per box)."""
        logits = self.logits(self.crops(images, boxes))
        out, start = {}, 0
        for name, labels in self.config.heads:
            z = logits[:, start:start + len(labels)]
            z = np.exp(z - z.max(1, keepdims=True))
            out[name] = z / z.sum(1, keepdims=True)
            start += len(labels)
        return out

    def predict(self, images, boxes: np.ndarray | None = None) -> dict[str, list[str]]:
        """``{head: [label, ...]}`` the most likely label per image / box."""
        return {name: [self.config.labels(name)[i] for i in p.argmax(1)]
                for name, p in self.probabilities(images, boxes).items()}

    def accuracy(self, images, labels: dict[str, Sequence], boxes: np.ndarray | None = None) -> dict[str, float]:
        """Per-head accuracy against label names or indices."""
        pred = self.probabilities(images, boxes)
        out = {}
        for name, truth in labels.items():
            names = self.config.labels(name)
            idx = np.array([names.index(t) if isinstance(t, str) else int(t) for t in truth])
            out[name] = float(np.mean(pred[name].argmax(1) == idx))
        return out

    def save(self, folder: str | os.PathLike) -> str:
        return save_model(folder, self.kind, self.config.to_dict(), self.params, {"metrics": self.metrics})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> AttributeClassifier:
        config, params, meta = load_model(folder, cls.kind)
        config["heads"] = tuple((n, tuple(v)) for n, v in config["heads"])
        return cls(ClassifierConfig(**config), params, meta.get("metrics"))


def train_classifier(images: np.ndarray, labels: dict[str, np.ndarray], config: ClassifierConfig,
                     boxes: np.ndarray | None = None, *, steps: int = 400, batch_size: int = 64,
                     learning_rate: float = 2e-3, seed: int = 0, progress: bool = True) -> AttributeClassifier:
    """Train on ``images`` (``uint8 [N, H, W, 3]``) with integer ``labels[head]`` ``[N]`` for every head and, for
    ``input="face"``, the face ``boxes`` ``[N, 4]`` (``"region"``: ``boxes`` are regions, default whole images).

    Augmentation: box / region jitter and mild colour changes (mild, since colours are labels here)."""
    images = np.asarray(images)
    c = config
    missing = [n for n in c.head_names if n not in labels]
    if missing:
        raise ValueError(f"train_classifier: no labels for heads {missing}")
    ys = [np.asarray(labels[n], np.int64) for n in c.head_names]
    for n, y in zip(c.head_names, ys):
        if len(y) != len(images) or y.min() < 0 or y.max() >= len(c.labels(n)):
            raise ValueError(f"labels[{n!r}]: expected {len(images)} ints in [0, {len(c.labels(n))}), got "
                             f"shape {y.shape} range [{y.min()}, {y.max()}]")
    clf = AttributeClassifier(c, None)
    base = clf.matrices(images, boxes)
    module = clf.module
    params = init_params(module, jnp.zeros((1, c.crop_size, c.crop_size, 3)), seed)
    sizes = [len(c.labels(n)) for n in c.head_names]
    y_all = np.stack(ys, 1)
    face = c.input == "face"

    def sample(rng):
        idx = rng.integers(0, len(images), batch_size)
        m = jitter_matrices(rng, base[idx], c.crop_size, rotate=6.0 if face else 2.0, scale=0.08 if face else 0.04,
                            shift=0.06 if face else 0.03)
        crops = warp_crops(images[idx], m, c.crop_size, border="edge")
        return to_unit(augment_crops(rng, crops, 1.0 if face else 0.3)), y_all[idx]

    def loss_fn(p, batch):
        x, y = batch
        logits = module.apply({"params": p}, x)
        loss, start = 0.0, 0
        for h, k in enumerate(sizes):
            z = jax.nn.log_softmax(logits[:, start:start + k])
            loss = loss + -jnp.mean(jnp.take_along_axis(z, y[:, h:h + 1], 1))
            start += k
        return loss, loss

    params, losses = fit(loss_fn, params, sample, steps=steps, learning_rate=learning_rate, seed=seed,
                         desc=f"classifier ({', '.join(c.head_names)})", progress=progress)
    return AttributeClassifier(c, params, {"final_loss": float(losses[-10:].mean()), "steps": int(steps)})


@dataclasses.dataclass
class EvalModels:
    """The evaluation models of a SynthFace model folder (``None`` where a sub-folder is missing)."""

    recognizer: SyntheticRecognizer | None
    face_classifier: AttributeClassifier | None
    scene_classifier: AttributeClassifier | None


def load_eval_models(models_dir: str | os.PathLike) -> EvalModels:
    """Load ``eval_recognizer/``, ``face_classifier/`` and ``scene_classifier/`` from ``models_dir``."""
    folder = os.fspath(models_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"SynthFace models folder {folder!r} does not exist")

    def opt(sub, cls):
        path = os.path.join(folder, sub)
        return cls.load(path) if os.path.isdir(path) else None

    return EvalModels(opt("eval_recognizer", SyntheticRecognizer), opt("face_classifier", AttributeClassifier),
                      opt("scene_classifier", AttributeClassifier))
