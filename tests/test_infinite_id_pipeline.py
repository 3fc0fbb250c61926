"""Infinite-ID on the tiny SD: the pipeline (shared noise, the text stream is plain text-to-image, mixing off + λ=0
is the base model, identity stacking, errors), the CLI module and the training stage (train/infinite_id.py)."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from dynamicid_jax.faces import Face, NoFaceError, register_backend
from dynamicid_jax.methods import infinite_id as iid
from dynamicid_jax.methods.infinite_id_weights import save_infinite_id
from dynamicid_jax.models.clip import load_image_encoder
from dynamicid_jax.pipelines.infinite_id import InfiniteIDPipeline
from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion
from tiny_sd import make_tiny_sd

EMBED_DIM = 16
# the ArcFace template (112 px) scaled onto a 64-px reference image
KPS = np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]]) * 64 / 112


class FakeAnalyzer:
    """One face per image at fixed keypoints; the embedding is a fixed projection of the image's colours. An
    all-black image has no face."""

    embedding_dim = EMBED_DIM
    num_landmarks = 5

    def __init__(self):
        self.proj = np.random.default_rng(9).standard_normal((48, EMBED_DIM))

    def analyze(self, image):
        image = np.asarray(image)
        if image.max() == 0:
            return []
        small = image.reshape(4, image.shape[0] // 4, 4, image.shape[1] // 4, 3).mean((1, 3)).reshape(-1) / 255
        e = (small - 0.5) @ self.proj
        return [Face(bbox=[8, 8, 56, 60], kps=KPS, landmarks=KPS, embedding=e / np.linalg.norm(e), pose=[0, 0, 0],
                     det_score=0.99)]


register_backend("infinite-id-test", lambda **_: FakeAnalyzer(), overwrite=True)


def _same_image(a, b, what):
    """Equal up to float32 rounding: kernels batched differently (4 UNet rows here, 2 in plain CFG) may round
    differently, which moves a handful of pixels by one level."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) < 2e-3, f"{what}: max diff {diff.max()}, {np.mean(diff > 0):.2%}"


def _reference(seed):
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def iid_dirs(tmp_path_factory, torch):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("infinite_id")
    sd_dir = make_tiny_sd(str(root / "sd"))
    torch.manual_seed(3)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=32,
        patch_size=4, projection_dim=48)).eval()
    vision.save_pretrained(str(root / "clip"), safe_serialization=True)
    sd = StableDiffusion.from_pretrained(sd_dir, scheduler="ddim")
    enc_cfg = iid.infinite_id_encoder_config("tiny")
    rng = np.random.default_rng(0)
    # random ID projections from the shapes alone (no UNet init to compile), scaled like the text ones
    ids = jax.tree_util.tree_map(lambda s: (rng.standard_normal(s.shape) * 0.3).astype(np.float32),
                                 nn.meta.unbox(iid.abstract_id_params(sd.unet.config)))
    save_infinite_id(str(root / "weights"), enc_cfg, iid.init_encoder_params(enc_cfg, jax.random.key(0)),
                     ids, sd.unet.config)
    return sd_dir, str(root / "clip"), str(root / "weights"), sd


@pytest.fixture(scope="session")
def pipe(iid_dirs):
    _, clip_dir, weights_dir, sd = iid_dirs
    return InfiniteIDPipeline.from_pretrained(sd, weights_dir, clip_dir, face_analyzer="infinite-id-test")


COMMON = dict(negative_prompt="blurry", steps=3, guidance_scale=5.0, seed=3, height=64, width=64,
              return_text_stream=True)


def test_text_stream_is_text_to_image_and_mixing_off_is_the_base_model(pipe):
    sd = pipe.sd
    plain = sd.generate("a photo of a person", negative_prompt="blurry", height=64, width=64, steps=3,
                        guidance_scale=5.0, seed=3)
    ident, text = pipe("a photo of a person", references=[_reference(1)], **COMMON)
    assert ident.dtype == np.uint8 and ident.shape == (1, 64, 64, 3)
    _same_image(text, plain, "text stream vs StableDiffusion.generate")
    assert np.abs(ident.astype(int) - text.astype(int)).max() > 8  # the ID stream is not
    compiled = pipe.num_compiled
    # mixing off on every step and λ = 0: the ID stream is the base model from the same (shared) noise
    off_id, off_text = pipe("a photo of a person", references=[_reference(1)], id_scale=0.0, mix_steps=(0, 0),
                            **COMMON)
    assert pipe.num_compiled == compiled, "λ and the mixing steps are traced values"
    _same_image(off_text, plain, "text stream, mixing off")
    _same_image(off_id, plain, "ID stream, mixing off + λ=0")
    # λ = 0 with mixing on: the streams never diverge and attending over [K; K] duplicates is plain attention
    mix_only, _ = pipe("a photo of a person", references=[_reference(1)], id_scale=0.0, **COMMON)
    _same_image(mix_only, plain, "mixing on, λ=0")
    # the ID branch alone changes the image; mixing then changes it again (the streams differ now)
    id_only, _ = pipe("a photo of a person", references=[_reference(1)], mix_steps=(0, 0), **COMMON)
    assert np.abs(id_only.astype(int) - plain.astype(int)).max() > 8
    assert np.abs(id_only.astype(int) - ident.astype(int)).max() > 8
    other, _ = pipe("a photo of a person", references=[_reference(2)], **COMMON)
    assert np.abs(other.astype(int) - ident.astype(int)).max() > 0  # the identity matters


def test_identity_tokens_stack_references(pipe):
    one = np.asarray(pipe.identity_tokens([_reference(1)]))
    two = np.asarray(pipe.identity_tokens([_reference(1), _reference(2)]))
    t = pipe.encoder.config.num_tokens
    assert one.shape == (1, t, 32) and two.shape == (1, 2 * t, 32)
    np.testing.assert_allclose(two[:, :t], one, atol=1e-5)
    assert np.abs(two[:, t:] - one).max() > 1e-3
    null = np.asarray(pipe.null_tokens())
    assert null.shape == (1, t, 32) and np.abs(null - one).max() > 1e-3


def test_bad_input(pipe):
    ref = _reference(1)
    with pytest.raises(NoFaceError, match="reference image 1"):
        pipe.identity_tokens([ref, np.zeros((64, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="exactly one of references"):
        pipe("a", steps=1, height=64, width=64)
    with pytest.raises(ValueError, match="multiple of 32"):
        pipe("a", references=[ref], height=60, width=64)
    with pytest.raises(ValueError, match="mix_steps"):
        pipe("a", references=[ref], steps=3, mix_steps=(2, 5), height=64, width=64)
    with pytest.raises(ValueError, match="id_tokens must be"):
        pipe("a", id_tokens=np.zeros((1, 5, 32), np.float32), steps=1, height=64, width=64)
    with pytest.raises(ValueError, match="match no self-attention"):
        pipe("a", references=[ref], steps=1, height=64, width=64, mix_layers=("nowhere",))


def _cli_parser():
    """The generate parser: Infinite-ID's own options plus the identity options every method shares."""
    from infer.generate import build_parser

    return build_parser()


def test_cli_arguments(tmp_path):
    from infer import generate as cli

    parser = _cli_parser()
    args = parser.parse_args(["--model", "m", "--prompt", "x", "--out", "x.png", "--reference", "a.png",
                              "--reference", "b.png", "--no-adain", "--mix-steps", "5:25", "--mix-layers",
                              "up_blocks, mid_block", "--id-scale", "0.5"])
    assert args.reference == ["a.png", "b.png"] and not args.adain and args.id_scale == 0.5
    assert args.guidance_scale is None and args.steps is None  # → the Infinite-ID defaults in run()
    assert cli.parse_mix_steps(args.mix_steps) == (5, 25) and cli.parse_mix_steps("0:") == (0, None)
    assert cli.parse_mix_layers(args.mix_layers) == ("up_blocks", "mid_block")
    assert cli.parse_mix_layers("all") is None
    with pytest.raises(SystemExit, match="--infinite-id-weights, --image-encoder"):
        cli.run_infinite_id(parser.parse_args(["--model", "m", "--prompt", "x", "--out", "x.png", "--reference", "r.png"]))
    with pytest.raises(ValueError, match="START:END"):
        cli.parse_mix_steps("5")


@pytest.mark.slow
def test_cli_end_to_end(iid_dirs, tmp_path):
    from infer import generate as cli

    sd_dir, clip_dir, weights_dir, _ = iid_dirs
    parser = _cli_parser()
    ref_path = tmp_path / "ref.png"
    from dynamicid_jax.file_io import save_png

    save_png(_reference(1), ref_path)
    args = parser.parse_args([
        "--model", sd_dir, "--prompt", "a photo of a person", "--negative-prompt", "blurry", "--height", "64",
        "--width", "64", "--steps", "3", "--seed", "3", "--out", str(tmp_path / "id.png"),
        "--reference", str(ref_path), "--infinite-id-weights", weights_dir, "--image-encoder", clip_dir,
        "--analyzer", "infinite-id-test", "--save-text-stream", str(tmp_path / "text.png")])
    assert cli.run_infinite_id(args) == 0
    from PIL import Image

    ident = np.asarray(Image.open(tmp_path / "id.png"))
    text = np.asarray(Image.open(tmp_path / "text.png"))
    assert ident.shape == text.shape == (64, 64, 3) and np.abs(ident.astype(int) - text.astype(int)).max() > 8
    plain = StableDiffusion.from_pretrained(sd_dir).generate("a photo of a person", negative_prompt="blurry",
                                                              height=64, width=64, steps=3, guidance_scale=5.0,
                                                              seed=3)
    _same_image(text[None], plain, "CLI text stream (default guidance 5.0) vs text-to-image")


@pytest.mark.slow
def test_two_identities_and_layer_subset(pipe):
    one = pipe("a photo of a person", references=[_reference(1)], **COMMON)[0]
    two = pipe("a photo of a person", references=[_reference(1), _reference(2)], **COMMON)[0]
    assert np.abs(two.astype(int) - one.astype(int)).max() > 0
    up = pipe("a photo of a person", references=[_reference(1)], mix_layers=("up_blocks",), **COMMON)[0]
    assert np.abs(up.astype(int) - one.astype(int)).max() > 0
    no_layers, text = pipe("a photo of a person", references=[_reference(1)], id_scale=0.0, mix_layers=(),
                           **COMMON)
    assert np.abs(no_layers.astype(int) - text.astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------------------- training
TRAIN = ["model.encoder_variant=tiny", "model.dtype=float32", "train.progress_bar=false", "train.log_every=1",
         "checkpoint.every=0"]


@pytest.fixture(scope="session")
def stage(iid_dirs):
    from train import runs
    from train.config import load_config
    from train.infinite_id import DEFAULTS, InfiniteIDStage

    sd_dir, clip_dir, _, sd = iid_dirs
    base = runs.BaseModel(unet_config=sd.unet.config, vae=sd.vae, text_encoder=sd.text_encoder,
                            tokenizer=sd.tokenizer, scheduler=sd.scheduler, params=dict(sd.params),
                            scaling_factor=float(sd.vae.config.scaling_factor), source=sd_dir)
    cfg = load_config(None, TRAIN + [f"model.base={sd_dir}"], defaults=DEFAULTS)
    module, params = load_image_encoder(clip_dir)
    return InfiniteIDStage(cfg, base=base, image_encoder=(module, params, clip_dir))


def _train_batch(b=2, seed=0, pixels=False):
    rng = np.random.default_rng(seed)
    batch = {"ref_clip_pixels": rng.standard_normal((b, 32, 32, 3)).astype(np.float32),
             "ref_id_embedding": rng.standard_normal((b, EMBED_DIM)).astype(np.float32),
             "input_ids": rng.integers(1, 1000, (b, 77)).astype(np.int32), "identity": np.arange(b, dtype=np.int32)}
    if pixels:
        batch["target_pixels"] = rng.uniform(-1, 1, (b, 64, 64, 3)).astype(np.float32)
    else:
        batch["target_latent_moments"] = rng.standard_normal((b, 8, 8, 8)).astype(np.float32)
    return batch


def test_training_stage_trees_and_traced_step(stage):
    """Trainable = the two mappers + to_k_id/to_v_id (no base UNet weight, no text encoder anywhere); the task's
    loss (what the shared train loop differentiates) is a finite scalar whose gradient reaches every leaf of that
    tree (finite, non-zero) and nothing else."""
    from flax import traverse_util
    from gradient_checks import assert_gradients_on_every_leaf, trainable_gradients

    from train import loop

    task = stage.task()
    trainable = traverse_util.flatten_dict(loop._unboxed(task.abstract_trainable))
    assert {k[0] for k in trainable} == {"encoder", "id_projections"}
    assert {k[1] for k in trainable if k[0] == "encoder"} == {"clip_mapper", "face_mapper"}
    assert all(iid.is_id_path(k) for k in trainable if k[0] == "id_projections")
    assert set(task.frozen) == {"unet", "vae", "null_clip_features", "image_encoder"}
    assert not any(iid.is_id_path(k) for k in traverse_util.flatten_dict(task.frozen["unet"]))
    assert stage.enc_cfg.clip_input == "image"  # the stage-1 loader feeds CLIP the whole reference
    params, mutable = jax.jit(task.init)(jax.random.key(0), task.frozen)
    batch = loop.numeric_batch(_train_batch())
    loss, (metrics, _), grads = trainable_gradients(task.loss_fn, params, task.frozen, mutable, batch,
                                                    jax.random.key(1))
    assert loss.shape == () and np.isfinite(float(loss))
    assert float(metrics["id_dropped"]) == 0  # (a dropped row feeds the face mapper zeros)
    assert_gradients_on_every_leaf(grads, params)


@pytest.mark.slow
def test_training_stage_trains_and_exports_for_the_pipeline(stage, iid_dirs, tmp_path):
    """Two steps on a data=2 mesh (both target formats): the trainable params move, the frozen ones stay bitwise
    the same, the export loads into the pipeline, whose text stream is still plain text-to-image."""
    from flax import traverse_util
    from gradient_checks import assert_bitwise_unchanged, snapshot

    from dynamicid_jax import sharding as sh
    from train import loop
    from train.config import load_config
    from train.infinite_id import DEFAULTS

    _, clip_dir, _, sd = iid_dirs
    task = stage.task(references=_train_batch(1))
    cfg = load_config(None, TRAIN + ["mesh.data=2", "train.steps=2", "train.sample_every=2", "sample.steps=2",
                                     "sample.size=64"], defaults=DEFAULTS)
    tr = loop.Trainer(task, cfg, str(tmp_path), mesh=sh.make_mesh(sh.MeshConfig(data=2), devices=jax.devices()[:2]))
    state0 = jax.device_get(tr.init_state())
    init_ids = traverse_util.flatten_dict(state0.trainable["id_projections"])
    base_flat = traverse_util.flatten_dict(task.frozen["unet"])
    for k, v in init_ids.items():  # to_k_id / to_v_id start as the text to_k / to_v
        np.testing.assert_array_equal(v, base_flat[k[:-2] + (k[-2][:-3], "kernel")])
    frozen0 = snapshot(tr.frozen)
    state = tr.fit(iter([_train_batch(2, 1), _train_batch(2, 2, pixels=True)]))
    assert_bitwise_unchanged(frozen0, tr.frozen, "Infinite-ID frozen params (UNet, VAE, CLIP)")
    after = traverse_util.flatten_dict(jax.device_get(state.trainable))
    before = traverse_util.flatten_dict(state0.trainable)
    assert all(not np.allclose(after[k], before[k]) for k in after if k[-1] == "kernel" and "id_projections" in k)
    assert (tmp_path / "samples").exists()
    stage.export(state, str(tmp_path))
    pipe = InfiniteIDPipeline.from_pretrained(sd, str(tmp_path / "export"), clip_dir,
                                              face_analyzer="infinite-id-test")
    ident, text = pipe("a photo of a person", references=[_reference(1)], **COMMON)
    plain = sd.generate("a photo of a person", negative_prompt="blurry", height=64, width=64, steps=3,
                        guidance_scale=5.0, seed=3)
    _same_image(text, plain, "text stream after training")
    assert np.abs(ident.astype(int) - plain.astype(int)).max() > 0
