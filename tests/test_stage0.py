"""Stage 0 (synthface/stage0.py): the quick preset (the quick demo's stage 0, shared with tests/test_demo.py) gives a
diffusers folder that our loader and diffusers both read; a rerun skips finished phases; the VAE's scaling factor
is 1/std of its latents; bad configs fail early with clear errors."""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthface import stage0, stage0_phases
from train.config import ConfigError


@pytest.fixture(scope="module")
def synth_root(quick_demo):
    return str(quick_demo / "work" / "synthface")


def quick_config(root, workdir, *extra):
    return stage0.stage0_config([f"data.root={root}", f"workdir={workdir}", "progress_bar=false", *extra],
                                quick=True)


@pytest.fixture(scope="module")
def quick_run(quick_demo, synth_root):
    """The quick demo's stage 0 (``--quick``, the shipped SynthFace config, its 4-identity world) and that config."""
    workdir = str(quick_demo / "work" / "stage0")
    return quick_config(synth_root, workdir), workdir, os.path.join(workdir, "export", "sd")


def test_quick_export_folder(quick_run):
    cfg, workdir, folder = quick_run
    assert folder == os.path.join(workdir, "export", "sd")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert os.path.exists(os.path.join(folder, part)), part
    with open(os.path.join(workdir, "export", "stage0_metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["vae_scale_factor"] == 4 and metrics["latent_shape"] == [16, 16, 4]
    assert metrics["vae"]["steps"] == cfg["vae"]["steps"] and metrics["diffusion"]["steps"] == cfg["diffusion"]["steps"]
    assert np.isfinite(metrics["diffusion"]["loss_last"]) and np.isfinite(metrics["vae"]["loss_last"])
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    assert (sched["beta_schedule"], sched["num_train_timesteps"], sched["beta_start"], sched["beta_end"]) == (
        "scaled_linear", 1000, 0.00085, 0.012)


def test_our_loader_reads_the_export(quick_run, synth_root):
    from synthface import load_split
    from dynamicid_jax.models.vae import encode_to_latents
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion
    from train.runs import load_base

    _, workdir, folder = quick_run
    sd = StableDiffusion.from_pretrained(folder)
    assert sd.vae_scale_factor == 4
    assert sd.text_encoder.config.hidden_size == 64 and sd.text_encoder.config.vocab_size == 49408
    assert sd.text_encoder.config.eos_token_id == 49407 and sd.unet.config.cross_attention_dim == 64
    images, _ = load_split(synth_root, "train")
    latents = np.asarray(encode_to_latents(sd.vae, sd.params["vae"], images[:2], None))
    assert latents.shape == (2, 16, 16, 4)
    # the scaling factor is 1/std of the (sampled) latents of the training images, as the moments were stored
    moments = np.load(os.path.join(workdir, "vae", "moments.npy"))
    assert moments.shape == (len(images), 16, 16, 8)
    mean = np.asarray(sd.vae.apply({"params": sd.params["vae"]}, jnp.asarray(images[:2], jnp.float32) / 127.5 - 1,
                                   method="encode").mean)
    np.testing.assert_allclose(moments[:2, ..., :4], mean, atol=1e-4)
    np.testing.assert_allclose(latents, mean * sd.vae.config.scaling_factor, rtol=1e-5, atol=1e-5)
    assert sd.vae.config.scaling_factor == pytest.approx(stage0.latent_scaling_factor(moments), rel=1e-6)
    z = moments[..., :4] + np.exp(0.5 * moments[..., 4:]) * np.random.default_rng(0).standard_normal(
        moments[..., :4].shape)
    assert sd.vae.config.scaling_factor == pytest.approx(1.0 / z.std(), rel=0.02)
    base = load_base(folder, jnp.float32)  # what stages 1 and 2 load
    assert base.scaling_factor == pytest.approx(sd.vae.config.scaling_factor)


def test_diffusers_reads_the_export(quick_run):
    pytest.importorskip("diffusers")
    import torch
    from diffusers import StableDiffusionPipeline

    folder = quick_run[2]
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert pipe.vae_scale_factor == 4
    assert pipe.unet.config.sample_size == 16 and pipe.text_encoder.config.hidden_size == 64
    with torch.no_grad():
        moments = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        eps = pipe.unet(torch.zeros(1, 4, 16, 16), 10, encoder_hidden_states=torch.zeros(1, 77, 64)).sample
    assert tuple(moments.shape) == (1, 4, 16, 16) and tuple(eps.shape) == (1, 4, 16, 16)


def test_rerun_skips_finished_phases(quick_run, synth_root):
    cfg, workdir, folder = quick_run
    stamp = os.path.getmtime(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    start = time.perf_counter()
    assert stage0.run_stage0(cfg) == folder
    assert time.perf_counter() - start < 5.0
    assert os.path.getmtime(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")) == stamp
    # without the export, the finished phases are reused (no training step) and only the export is written again
    import shutil

    shutil.rmtree(os.path.join(workdir, "export"))
    with open(os.path.join(workdir, "diffusion", "losses.jsonl")) as f:
        logged = f.read()
    stage0.run_stage0(cfg)
    with open(os.path.join(workdir, "diffusion", "losses.jsonl")) as f:
        assert f.read() == logged
    with open(os.path.join(workdir, "export", "stage0_metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["vae"]["skipped"] and metrics["diffusion"]["skipped"]


def test_changed_settings(quick_run, synth_root):
    _, workdir, _ = quick_run
    with pytest.raises(ValueError, match="other settings"):
        stage0.run_stage0(quick_config(synth_root, workdir, "diffusion.lr=0.5"))


def test_bad_configs(synth_root, tmp_path):
    with pytest.raises(ValueError, match="data.root"):
        stage0.validate(stage0.stage0_config([f"workdir={tmp_path}"], quick=True))
    with pytest.raises(ValueError, match="data.resolution must be a positive multiple of"):
        stage0.validate(quick_config(synth_root, tmp_path, "data.resolution=62"))
    with pytest.raises(ValueError, match="vae.crop"):
        stage0.validate(quick_config(synth_root, tmp_path, "vae.crop=30"))
    with pytest.raises(ConfigError, match="unknown config key"):
        quick_config(synth_root, tmp_path, "vae.stepz=3")
    with pytest.raises(ValueError, match="cross_attention_dim"):
        stage0.validate(quick_config(synth_root, tmp_path, "model.unet_overrides={cross_attention_dim: 32}"))
    # the loss weighting is checked before any data is read, not when the diffusion phase starts
    with pytest.raises(ValueError, match="diffusion.loss_weighting must be"):
        stage0.validate(quick_config(synth_root, tmp_path, "diffusion.loss_weighting=snr"))
    with pytest.raises(ValueError, match=r"diffusion.weight_floor must be a number in \[0, 1\]"):
        stage0.validate(quick_config(synth_root, tmp_path, "diffusion.loss_weighting=signal_floor",
                                     "diffusion.weight_floor=2"))
    with pytest.raises(ValueError, match="diffusion.snr_gamma must be a number > 0"):
        stage0.validate(quick_config(synth_root, tmp_path, "diffusion.loss_weighting=min_snr",
                                     "diffusion.snr_gamma=0"))
    with pytest.raises(ValueError, match="diffusion.text_aux_weight must be a number >= 0, got -1"):
        stage0.validate(quick_config(synth_root, tmp_path, "diffusion.text_aux_weight=-1"))
    with pytest.raises(SystemExit, match="data.root"):
        stage0.main(["--quick", f"workdir={tmp_path}"])


def test_text_aux_loss_learns_to_read_the_named_expression(quick_run, synth_root, tmp_path):
    """With ``diffusion.text_aux_weight`` > 0 the diffusion phase also trains the expression readout on the texts
    that name an expression: its cross-entropy is logged and falls, the logged loss includes it, and the export
    holds the same files as without it (the readout is not part of the base). The quick run's VAE phase is copied in
    and reused (only ``diffusion.*`` differs), as a rerun in the same workdir would."""
    import shutil

    shutil.copytree(os.path.join(quick_run[1], "vae"), str(tmp_path / "w" / "vae"))
    cfg = quick_config(synth_root, str(tmp_path / "w"), "diffusion.text_aux_weight=1.0", "diffusion.steps=60",
                       "diffusion.log_every=1", "diffusion.lr=0.003", "diffusion.batch_size=16")
    stage0.run_stage0(cfg)
    params = os.path.join("vae", "params.safetensors")  # reused, not retrained: the copy was not rewritten
    assert os.stat(tmp_path / "w" / params).st_mtime_ns == os.stat(os.path.join(quick_run[1], params)).st_mtime_ns
    rows = stage0_phases.read_losses(str(tmp_path / "w" / "diffusion"))
    assert len(rows) == 60 and all(0.0 <= r["text_aux_acc"] <= 1.0 for r in rows)
    ce = np.array([r["text_aux_ce"] for r in rows])
    assert ce[-15:].mean() < 0.25 * ce[:5].mean(), ce  # ln 7 ≈ 1.95 at chance
    assert all(r["loss"] >= r["text_aux_ce"] for r in rows)  # weight 1: the loss is the weighted MSE + the CE

    def files(folder):
        return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)

    assert files(str(tmp_path / "w" / "export" / "sd")) == files(quick_run[2])


def test_text_variants_and_host_init():
    rec = {"caption": "a photo of a person in a red shirt on the left, blue background",
           "face_prompt": "in a happy expression, in side view",
           "grid_prompt": "the expression is happy, the face is fully turned to the left"}
    caption, face, grid = stage0.text_variants(rec)
    assert caption == rec["caption"] and face.endswith(", in a happy expression, in side view")
    assert grid.startswith(caption + ", the expression is happy")
    from dynamicid_jax.models.clip import CLIPTextModel, text_config

    module = CLIPTextModel(text_config("synthface"))
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"]
    params = stage0_phases.host_init(abstract, 0)
    assert params["embeddings"]["token_embedding"]["embedding"].shape == (49408, 64)
    assert abs(float(params["embeddings"]["token_embedding"]["embedding"].std()) - 0.02) < 1e-3
    kernel = params["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert abs(float(kernel.std()) - 1 / 8) < 0.01 and float(np.abs(kernel).max()) <= 2 / 8 / 0.8796 + 1e-6
    assert np.all(params["final_layer_norm"]["scale"] == 1)


def test_export_base_writes_a_verified_fp16_folder(quick_run, synth_root, tmp_path):
    """``make base``'s export step on the quick stage 0: an fp16 folder with the unused text-embedding rows zeroed,
    a provenance whose hashes verify and that names the CPU, our loader reading it back within fp16 rounding; an
    existing folder that we did not write is refused, one that we wrote is replaced."""
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion
    from synthface import demo_base

    _, workdir, folder = quick_run
    with open(os.path.join(workdir, "export", "stage0_metrics.json")) as f:
        metrics = json.load(f)
    out = str(tmp_path / "base")
    demo_base.export_base(folder, out, data_root=synth_root, stage0_metrics=metrics, command="test")
    provenance = demo_base.verify_base(out)
    assert provenance["command"] == "test" and provenance["diffusion"]["steps"] == metrics["diffusion"]["steps"]
    assert provenance["machine"]["cpu"] and provenance["machine"]["cores"] >= 1  # bit-repeatable on one kind of CPU
    fp32, fp16 = StableDiffusion.from_pretrained(folder), StableDiffusion.from_pretrained(out)
    a = np.asarray(fp32.params["unet"]["conv_in"]["kernel"])
    np.testing.assert_allclose(np.asarray(fp16.params["unet"]["conv_in"]["kernel"]), a, rtol=1e-3, atol=1e-4)
    table = np.asarray(fp16.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"])
    kept = np.flatnonzero(np.abs(table).sum(1) > 0)
    assert len(kept) == provenance["text_vocabulary"]["kept_rows"] == len(
        demo_base.used_token_ids(fp16.tokenizer, demo_base.world_texts(synth_root)))
    demo_base.export_base(folder, out, data_root=synth_root, stage0_metrics=metrics, command="again")
    assert demo_base.verify_base(out)["command"] == "again"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a SynthFace base"):
        demo_base.export_base(folder, str(foreign), data_root=synth_root, stage0_metrics=metrics, command="x")
    assert (foreign / "notes.txt").read_text() == "mine"
