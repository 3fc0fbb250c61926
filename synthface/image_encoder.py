"""SynthFace's image encoder: a tiny CLIP vision tower that has learnt to see faces.

DynamicID reads a reference through two encoders: the recogniser's embedding (identity, blind to expression by
training) and CLIP's penultimate hidden states (everything else the image shows, expression and pose included).
SD1.5's CLIP-H learnt that from LAION; in SynthFace no such model exists, and a random tower's features follow the
colours of the image, not the face (docs/demo.md: expression explained about 1 % of the stage-1 tokens' variance
within an identity). This module trains the same ``CLIPVisionModelWithProjection`` architecture, small, on the
world's training identities to tell identity, expression and pose apart from whole images — linear heads on its
flattened penultimate hidden states, the features the ID encoder reads — and saves it in transformers' format,
so stage 1 and the pipeline load it like any CLIP folder (``model.image_encoder=MODELS/image_encoder``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["IMAGE_ENCODER_CONFIG", "ImageEncoderResult", "train_image_encoder", "image_encoder_accuracy"]

#: 64 px whole images in 8-px patches (the face fills most of the frame), width 64 like the tiny ID encoder's
#: ``clip_dim``
IMAGE_ENCODER_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                            image_size=64, patch_size=8, projection_dim=48)


@dataclasses.dataclass
class ImageEncoderResult:
    """The trained tower (``module``, ``params``), its linear heads and training metrics."""

    module: Any
    params: Any
    heads: dict[str, np.ndarray]
    labels: dict[str, list[str]]
    metrics: dict[str, Any]

    def save(self, folder: str) -> str:
        from dynamicid_jax.models.clip import save_image_encoder

        from dynamicid_jax.file_io import write_json

        save_image_encoder(folder, self.module, self.params)
        payload = {"labels": self.labels, "metrics": self.metrics,
                   "heads": {k: np.asarray(v).tolist() for k, v in self.heads.items()}}
        write_json(payload, os.path.join(folder, "heads.json"))
        return folder


def _pixels(images: np.ndarray, size: int) -> np.ndarray:
    from dynamicid_jax.models.clip import clip_preprocess

    return clip_preprocess(np.asarray(images, np.uint8), size=size)


#: std of the position embeddings at initialisation. CLIP's default (0.02) leaves the tokens of a freshly
#: initialised tower nearly free of position, so its attention treats the image as a bag of patches: in 200 steps
#: a pose head learnt nothing (loss stayed at ln 5). At 1.0 every token carries where it sits — what the ID
#: encoder's attention needs to read pose and expression from the tokens (measured: pose 0.87, expression 0.40
#: on held-out identities after 600 steps; chance 0.20 / 0.14).
POSITION_INIT_STD = 1.0


def _features(module, params, pixels):
    """All penultimate hidden states, flattened (token order kept: the heads see where each feature sits)."""
    hidden = module.apply({"params": params}, pixels).hidden_states[-2]
    return hidden.reshape(hidden.shape[0], -1)


def train_image_encoder(images: np.ndarray, labels: dict[str, np.ndarray], names: dict[str, list[str]], *,
                        steps: int = 600, batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0,
                        progress: bool = True) -> ImageEncoderResult:
    """Train on ``images`` (``uint8 [N, H, W, 3]``) with integer ``labels[head]`` ``[N]`` (heads such as identity,
    expression, pose; ``names[head]`` their label names). Augmentation: shifts of up to 3 px and mild brightness."""
    import flax.linen as nn

    from synthface.faces.recognizer import fit
    from dynamicid_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**IMAGE_ENCODER_CONFIG)
    module = CLIPVisionModelWithProjection(config)
    size = config.image_size
    heads = list(labels)
    ys = np.stack([np.asarray(labels[h], np.int64) for h in heads], 1)
    if len(ys) != len(images):
        raise ValueError(f"labels: expected {len(images)} per head, got {len(ys)}")
    counts = [len(names[h]) for h in heads]
    base = _pixels(images, size)
    key = jax.random.key(seed)
    tower = nn.meta.unbox(module.init(key, jnp.zeros((1, size, size, 3))))["params"]
    embeddings = tower["vision_model"]["embeddings"]["position_embedding"]
    embeddings["embedding"] = POSITION_INIT_STD * jax.random.normal(jax.random.fold_in(key, 99),
                                                                    embeddings["embedding"].shape)
    width = config.hidden_size * (config.num_positions)
    head_params = {h: {"w": jnp.zeros((width, k)), "b": jnp.zeros((k,))} for h, k in zip(heads, counts)}
    params = {"tower": tower, "heads": head_params}

    def sample(rng):
        idx = rng.integers(0, len(base), batch_size)
        x = base[idx]
        dy, dx = rng.integers(-3, 4, 2)
        x = np.roll(x, (int(dy), int(dx)), axis=(1, 2))
        x = x * rng.uniform(0.9, 1.1, (batch_size, 1, 1, 1)).astype(np.float32)
        return x.astype(np.float32), ys[idx]

    def loss_fn(p, batch):
        x, y = batch
        f = _features(module, p["tower"], x)
        loss = 0.0
        for j, h in enumerate(heads):
            z = jax.nn.log_softmax(f @ p["heads"][h]["w"] + p["heads"][h]["b"])
            loss = loss - jnp.mean(jnp.take_along_axis(z, y[:, j:j + 1], 1))
        return loss, loss

    params, losses = fit(loss_fn, params, sample, steps=steps, learning_rate=learning_rate, seed=seed,
                         desc="image encoder (identity, expression, pose)", progress=progress)
    return ImageEncoderResult(module, params["tower"], {h: np.asarray(params["heads"][h]["w"]) for h in heads},
                              {h: list(names[h]) for h in heads},
                              {"final_loss": float(np.mean(losses[-10:])), "steps": int(steps), "heads": heads})


def image_encoder_accuracy(module, params, train_images: np.ndarray, train_labels: np.ndarray,
                           test_images: np.ndarray, test_labels: np.ndarray, ridge: float = 1e-2) -> float:
    """Accuracy of a ridge-regression probe on the tower's flattened penultimate features (fit on ``train``, scored
    on ``test``): how linearly readable a label is from what the ID encoder sees."""
    size = module.config.image_size
    feats = jax.jit(lambda x: _features(module, params, x))

    def embed(images):
        return np.concatenate([np.asarray(feats(jnp.asarray(_pixels(images[k:k + 256], size))))
                               for k in range(0, len(images), 256)])

    a, b = embed(train_images), embed(test_images)
    mu, sd = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    classes = np.unique(train_labels)
    y = (train_labels[:, None] == classes[None]).astype(np.float64)
    x = np.concatenate([a, np.ones((len(a), 1))], 1)
    # the dual form: features (tokens × width) may outnumber the images
    w = x.T @ np.linalg.solve(x @ x.T + ridge * len(a) * np.eye(len(a)), y)
    pred = classes[np.argmax(np.concatenate([b, np.ones((len(b), 1))], 1) @ w, 1)]
    return float(np.mean(pred == test_labels))
