"""A tiny random Stable Diffusion with SynthFace's dimensions and two face-analysis stand-ins, for the training
tests on SynthFace shards (tests/test_train_synthface.py).

``make_base`` writes the base with our own ``save_pretrained`` (64×64 images, a 3-level VAE: 16×16 latents, the
SD1.5 tokenizer, text width = cross-attention width = 64); its params are drawn with numpy from the abstract shapes,
so nothing compiles. ``ReferenceFace`` answers face analysis from the references' sidecars (the tiny world trains no
detector); ``NoFaces`` finds none."""
import os

import jax
import jax.numpy as jnp
import numpy as np

#: the recogniser's embedding width in the tiny world
EMBED = 32


def random_params(abstract, rng: np.random.Generator) -> dict:
    """numpy params for an abstract (possibly boxed) tree: norm scales / variances 1, biases / means 0, other
    weights N(0, 1/fan_in) — no compile, unlike a module's ``init``."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: x, dict(abstract),
                                                             is_leaf=lambda x: hasattr(x, "unbox")))
    out = {}
    for path, leaf in flat.items():
        leaf = leaf.unbox() if hasattr(leaf, "unbox") else leaf
        if path[-1] in ("scale", "var"):
            out[path] = np.ones(leaf.shape, np.float32)
        elif path[-1] in ("bias", "mean"):
            out[path] = np.zeros(leaf.shape, np.float32)
        else:
            fan_in = int(np.prod(leaf.shape[:-1])) or 1
            out[path] = (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    return traverse_util.unflatten_dict(out)


def random_state(task, seed: int = 0):
    """A :class:`~train.loop.TrainState` at step 0 with random trainable / mutable params (for exports that need
    no training step: the quick tests)."""
    from train import loop

    rng = np.random.default_rng(seed)
    return loop.TrainState(step=np.int32(0), trainable=random_params(task.abstract_trainable, rng), opt_state=None,
                           mutable=random_params(task.abstract_mutable, rng), ema=None,
                           rng=np.zeros((2,), np.uint32))


def make_base(folder: str, seed: int = 0) -> str:
    """A random SD with SynthFace's dimensions, written by our own ``save_pretrained`` (no compile: the params
    are drawn with numpy from the abstract shapes)."""
    from dynamicid_jax.models import unet as unet_lib
    from dynamicid_jax.models import vae as vae_lib
    from dynamicid_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion
    from dynamicid_jax.schedulers import SD15_SCHEDULER_CONFIG, load_scheduler
    from dynamicid_jax.tokenizer import load_tokenizer

    ucfg = unet_lib.UNetConfig(sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                               cross_attention_dim=64, attention_head_dim=2).validate()
    vcfg = vae_lib.VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8,
                             sample_size=64).validate()
    tcfg = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          projection_dim=64)
    unet, vae, text = unet_lib.UNet2DConditionModel(ucfg), vae_lib.AutoencoderKL(vcfg), CLIPTextModel(tcfg)
    rng = np.random.default_rng(seed)
    fill = lambda tree: random_params(tree, rng)  # noqa: E731
    text_abs = jax.eval_shape(text.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"]
    params = {"unet": fill(unet_lib.abstract_params(unet)), "vae": fill(vae_lib.abstract_params(vae)),
              "text_encoder": fill(text_abs)}
    sd = StableDiffusion(unet, vae, text, load_tokenizer(None), load_scheduler(SD15_SCHEDULER_CONFIG, kind="ddim"),
                         params)
    return sd.save_pretrained(folder)


class ReferenceFace:
    """Face analysis stand-in for pixels: the exact (sidecar) face of the reference image closest to the given
    pixels, scaled to their size. The pipelines analyse decoded pixels (the IMR source raster a 512×512 resize),
    and the tiny test world trains no detector."""

    def __init__(self, inner, *references: str):
        from dynamicid_jax.faces import load_rgb

        self.inner = inner
        self.refs = [(load_rgb(r).astype(np.float32), inner.analyze(r)[0]) for r in references]
        self.embedding_dim, self.num_landmarks = inner.embedding_dim, inner.num_landmarks

    def analyze(self, image):
        import dataclasses

        from PIL import Image

        if isinstance(image, (str, os.PathLike)):
            return self.inner.analyze(image)
        image = np.asarray(image)
        small = np.asarray(Image.fromarray(image).resize((64, 64), Image.Resampling.BILINEAR), np.float32)
        _, f = min(self.refs, key=lambda r: float(np.mean((r[0] - small) ** 2)))
        s = image.shape[0] / 64.0
        return [dataclasses.replace(f, bbox=f.bbox * s, kps=f.kps * s, landmarks=f.landmarks * s)]


class NoFaces:
    embedding_dim, num_landmarks = EMBED, 68

    def analyze(self, image):
        return []
