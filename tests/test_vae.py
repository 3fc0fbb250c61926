"""The Flax AutoencoderKL against diffusers' on random weights of a tiny, structurally complete config."""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from dynamicid_jax.models import vae as V
from dynamicid_jax.weights.keymap import WeightLoadError, count_params, read_safetensors, write_safetensors

TINY = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
# The second config switches off every optional module and uses 3 levels.
BARE = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=4, latent_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)


@functools.lru_cache(maxsize=None)
def _jitted(vae, method):
    return jax.jit(lambda params, x: vae.apply({"params": params}, x, method=method))


def run(vae, params, x, method=None):
    """``vae.apply`` jitted once per (module, method): keeps the suite fast and uses the compilation cache."""
    return _jitted(vae, method)(params, x)


def _random_diffusers_vae(torch, **config):
    from diffusers import AutoencoderKL

    model = AutoencoderKL(**config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturb every tensor, so that swapped norms / biases cannot go unnoticed
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="session")
def tiny(torch, tmp_path_factory):
    """(diffusers model, saved folder, our model, our params) for the TINY config."""
    model = _random_diffusers_vae(torch, **TINY)
    folder = str(tmp_path_factory.mktemp("vae") / "vae")
    model.save_pretrained(folder, safe_serialization=True)
    vae, params = V.load_vae(folder)
    return model, folder, vae, params


def _nchw(torch, x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", [(16, 24), (17, 23)])
def test_encode_matches_diffusers(tiny, torch, size):
    model, _, vae, params = tiny
    images = np.random.RandomState(0).uniform(-1, 1, (2, *size, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model.encode(_nchw(torch, images)).latent_dist
    post = run(vae, params, images, "encode")
    assert isinstance(post, V.DiagonalGaussian)
    assert post.mean.shape == (2, size[0] // 2, size[1] // 2, 4)  # the asymmetric pad floors odd sizes
    assert_close(post.mean, _nhwc(ref.mean), atol=1e-4, rtol=1e-4, what="posterior mean")
    assert_close(post.logvar, _nhwc(ref.logvar), atol=1e-4, rtol=1e-4, what="posterior logvar")
    assert_close(post.std, _nhwc(ref.std), atol=1e-4, rtol=1e-4, what="posterior std")
    assert_close(post.mode(), post.mean, atol=0, rtol=0, what="mode")


def test_decode_matches_diffusers(tiny, torch):
    model, _, vae, params = tiny
    latents = np.random.RandomState(1).randn(2, 8, 12, 4).astype(np.float32)
    with torch.no_grad():
        ref = model.decode(_nchw(torch, latents)).sample
    out = run(vae, params, latents, "decode")
    assert out.shape == (2, 16, 24, 3) and out.dtype == jnp.float32
    assert_close(out, _nhwc(ref), atol=1e-4, rtol=1e-4, what="decoded images")


def test_optional_modules_off_match_diffusers(torch, tmp_path):
    model = _random_diffusers_vae(torch, **BARE)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    vae, params = V.load_vae(str(tmp_path))
    assert "quant_conv" not in params and "attentions_0" not in params["encoder"]["mid_block"]
    images = np.random.RandomState(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(_nchw(torch, images)).sample  # mode of the posterior, decoded
    out = run(vae, params, images)
    assert_close(out, _nhwc(ref), atol=1e-4, rtol=1e-4, what="reconstruction without quant convs / attention")


def test_logvar_is_clipped():
    moments = jnp.concatenate([jnp.zeros((1, 2, 2, 4)), jnp.full((1, 2, 2, 2), -100.0),
                               jnp.full((1, 2, 2, 2), 100.0)], axis=-1)
    post = V.DiagonalGaussian.from_moments(moments)
    assert float(post.logvar.min()) == -30.0 and float(post.logvar.max()) == 20.0
    assert_close(V.DiagonalGaussian.from_moments(post.moments).logvar, post.logvar, atol=0, rtol=0, what="moments")


def test_sampling_and_scaled_latent_helpers(tiny):
    _, _, vae, params = tiny
    images = np.random.RandomState(3).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    rng = jax.random.key(7)
    post = run(vae, params, images, "encode")
    sample = post.sample(rng)
    assert_close(sample, post.mean + post.std * jax.random.normal(rng, post.mean.shape), atol=1e-6, rtol=0,
                 what="sample")
    assert not np.allclose(np.asarray(sample), np.asarray(post.sample(jax.random.key(8))))
    sf = vae.config.scaling_factor
    latents = V.encode_to_latents(vae, params, images, rng)
    assert_close(latents, sample * sf, atol=1e-6, rtol=1e-6, what="encode_to_latents")
    assert_close(V.encode_to_latents(vae, params, images, None), post.mean * sf, atol=1e-6, rtol=1e-6,
                 what="encode_to_latents(rng=None)")
    uint8 = np.round((images + 1) * 127.5).clip(0, 255).astype(np.uint8)
    assert_close(V.encode_to_latents(vae, params, uint8, None),
                 V.encode_to_latents(vae, params, uint8.astype(np.float32) / 127.5 - 1, None),
                 atol=1e-6, rtol=0, what="uint8 images")
    decoded = V.decode_latents(vae, params, latents)
    raw = run(vae, params, latents / sf, "decode")
    assert_close(decoded, np.clip(raw, -1, 1), atol=2e-5, rtol=0, what="decode_latents")
    assert float(jnp.abs(decoded).max()) <= 1.0


def test_shift_factor_is_applied(tiny):
    _, _, vae, params = tiny
    shifted = V.AutoencoderKL(V.VAEConfig(**{**vars(vae.config), "shift_factor": 0.25}))
    images = np.random.RandomState(4).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    mean = run(vae, params, images, "encode").mean
    latents = V.encode_to_latents(shifted, params, images, None)
    assert_close(latents, (mean - 0.25) * vae.config.scaling_factor, atol=1e-6, rtol=0, what="shifted latents")
    raw = run(vae, params, latents / vae.config.scaling_factor + 0.25, "decode")
    assert_close(V.decode_latents(shifted, params, latents), np.clip(raw, -1, 1), atol=2e-5, rtol=0,
                 what="shifted decode")


def test_bf16_compute_tracks_fp32(tiny):
    _, _, vae, params = tiny
    images = np.random.RandomState(5).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
    ref = run(vae, params, images)
    out = run(V.AutoencoderKL(vae.config, dtype=jnp.bfloat16), params, images)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max()) + 0.05


def test_key_map_round_trip(tiny):
    model, _, _, params = tiny
    exported = V.export_vae_state_dict(params)
    reference = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sorted(exported) == sorted(reference)
    for key, value in reference.items():
        assert exported[key].shape == value.shape, key
        assert np.array_equal(exported[key], value), key


def test_flax_names_mirror_diffusers(tiny):
    _, _, _, params = tiny
    assert params["encoder"]["down_blocks_0"]["resnets_1"]["conv1"]["kernel"].shape == (3, 3, 32, 32)
    assert params["encoder"]["down_blocks_1"]["resnets_0"]["conv_shortcut"]["kernel"].shape == (1, 1, 32, 64)
    assert params["encoder"]["down_blocks_0"]["downsamplers_0"]["conv"]["kernel"].shape == (3, 3, 32, 32)
    attn = params["encoder"]["mid_block"]["attentions_0"]
    assert sorted(attn) == ["group_norm", "to_k", "to_out_0", "to_q", "to_v"]
    assert len([k for k in params["decoder"]["up_blocks_0"] if k.startswith("resnets_")]) == 3
    assert "upsamplers_0" in params["decoder"]["up_blocks_0"] and "upsamplers_0" not in params["decoder"]["up_blocks_1"]


def test_legacy_attention_names_load(tiny, tmp_path):
    _, folder, _, params = tiny
    state = read_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state.items():
        for new, old in legacy.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in renamed
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    write_safetensors(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    _, loaded = V.load_vae(str(tmp_path))
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sd15_full_size_by_eval_shape():
    vae = V.AutoencoderKL(V.vae_config("sd15"))
    assert count_params(V.abstract_params(vae)) == 83_653_863
    images = jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32)
    params = V.abstract_params(vae)
    post = jax.eval_shape(lambda p, x: vae.apply({"params": p}, x, method="encode"), params, images)
    assert post.mean.shape == (1, 64, 64, 4)
    out = jax.eval_shape(lambda p, z: vae.apply({"params": p}, z, method="decode"), params,
                         jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32))
    assert out.shape == (1, 512, 512, 3)


def test_config_round_trip_with_diffusers(tiny, torch):
    model, folder, vae, _ = tiny
    with open(os.path.join(folder, "config.json")) as f:
        saved = json.load(f)
    assert saved["_class_name"] == "AutoencoderKL" and "_diffusers_version" in saved
    cfg = V.VAEConfig.from_dict({**saved, "_name_or_path": "somewhere"})
    assert cfg == vae.config and cfg.block_out_channels == (32, 64) and cfg.shift_factor is None
    ours = cfg.to_dict()
    assert {k: v for k, v in ours.items() if not k.startswith("_")} == \
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}
    assert V.VAEConfig.from_dict({**saved, "shift_factor": 0.0609}).shift_factor == 0.0609


@pytest.mark.parametrize("change, message", [
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types"),
    ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
    ({"norm_type": "spatial"}, "norm_type"),
    ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
    ({"norm_num_groups": 5}, "not divisible"),
    ({"act_fn": "mish"}, "mish"),
    ({"shift_factor": "big"}, "shift_factor"),
    ({"layers_per_block": 0}, "layers_per_block"),
    ({"use_quant_conv": "yes"}, "use_quant_conv"),
])
def test_bad_configs_are_rejected(tiny, change, message):
    _, folder, _, _ = tiny
    with open(os.path.join(folder, "config.json")) as f:
        saved = json.load(f)
    with pytest.raises(ValueError, match=message):
        V.VAEConfig.from_dict({**saved, **change})


def test_variants():
    assert V.vae_config("sd15").block_out_channels == (128, 256, 512, 512)
    assert V.vae_config("tiny").mid_block_add_attention
    with pytest.raises(ValueError, match="unknown VAE variant"):
        V.vae_config("sdxl")


@pytest.mark.parametrize("shape, dtype, method, message", [
    ((1, 3, 16, 16), np.float32, "encode", "NCHW"),
    ((16, 16, 3), np.float32, "encode", "NHWC"),
    ((1, 16, 16, 3), np.int32, "encode", "floating point"),
    ((1, 4, 4, 3), np.float32, "decode", "4 channels"),
])
def test_bad_inputs(tiny, shape, dtype, method, message):
    _, _, vae, params = tiny
    with pytest.raises(ValueError, match=message):
        vae.apply({"params": params}, np.zeros(shape, dtype), method=method)


def test_load_errors(tiny, tmp_path):
    _, folder, _, _ = tiny
    with pytest.raises(FileNotFoundError, match="does not exist"):
        V.load_vae(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config"):
        V.load_vae(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        V.load_vae(str(bad))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        V.load_vae(str(no_weights))
    (no_weights / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightLoadError, match="safetensors"):
        V.load_vae(str(no_weights))
    # weights of another shape / with a key missing: one error listing both
    state = read_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    del state["decoder.conv_out.bias"]
    state["encoder.conv_in.weight"] = np.zeros((8, 3, 3, 3), np.float32)
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), broken / "config.json")
    write_safetensors(state, str(broken / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"(?s)missing key.*decoder\.conv_out\.bias.*wrong-shape.*conv_in"):
        V.load_vae(str(broken))


def test_pipeline_folder_is_accepted(tiny, tmp_path):
    _, folder, _, params = tiny
    shutil.copytree(folder, tmp_path / "vae")
    vae, loaded = V.load_vae(str(tmp_path), dtype=jnp.bfloat16)
    assert vae.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(loaded))
    assert count_params(loaded) == count_params(params)
