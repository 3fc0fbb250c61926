"""Single-file (original LDM) key names: our split / inverse against diffusers' own single-file loaders.

Tiny random diffusers / transformers models with SD1.5's block layout are written to an LDM-named
``.safetensors`` by :func:`to_ldm_checkpoint`; then (a) :func:`split_ldm_checkpoint` gives back exactly the
original state dicts and (b) diffusers' ``from_single_file`` reads our file into the same weights.
"""
import json

import ml_dtypes
import numpy as np
import pytest

from dynamicid_jax.weights import single_file as sf
from dynamicid_jax.weights.keymap import WeightLoadError, write_safetensors

TINY_UNET = dict(
    sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=16,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8)
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=2)


@pytest.fixture(scope="session")
def tiny(torch, tmp_path_factory):
    """Tiny models (every tensor random, so no two same-shaped weights are equal), their state dicts, a config
    folder in diffusers layout, and the LDM-named single file written by our inverse map."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    models = {"unet": UNet2DConditionModel(**TINY_UNET), "vae": AutoencoderKL(**TINY_VAE),
              "text_encoder": CLIPTextModel(CLIPTextConfig(**TINY_CLIP))}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in models.values():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
    states = {name: {k: v.numpy().copy() for k, v in m.state_dict().items()} for name, m in models.items()}
    root = tmp_path_factory.mktemp("single_file")
    config_dir = root / "configs"
    models["unet"].save_config(str(config_dir / "unet"))
    models["vae"].save_config(str(config_dir / "vae"))
    models["text_encoder"].config.save_pretrained(str(config_dir / "text_encoder"))
    configs = {"unet": dict(models["unet"].config), "vae": dict(models["vae"].config)}
    ldm = sf.to_ldm_checkpoint(states["unet"], states["vae"], states["text_encoder"], configs["unet"],
                               configs["vae"])
    path = str(root / "tiny-ldm.safetensors")
    write_safetensors(ldm, path)
    return dict(models=models, states=states, configs=configs, config_dir=str(config_dir), ldm=ldm, path=path)


def _assert_same_state(actual, expected, what):
    assert sorted(actual) == sorted(expected), f"{what}: keys differ: {sorted(set(actual) ^ set(expected))[:10]}"
    for key, value in expected.items():
        got = np.asarray(actual[key])
        assert got.shape == value.shape, f"{what}: {key} shape {got.shape} != {value.shape}"
        assert np.array_equal(got, value), f"{what}: {key} differs"


def test_written_file_has_ldm_names(tiny):
    ldm = tiny["ldm"]
    assert all(k.startswith((sf.UNET_PREFIX, sf.VAE_PREFIX, sf.TEXT_PREFIX)) for k in ldm)
    unet = {k[len(sf.UNET_PREFIX):]: v for k, v in ldm.items() if k.startswith(sf.UNET_PREFIX)}
    # 3 levels × 2 layers: input_blocks 1,2 (res+attn), 3 (op), 4,5 (res+attn), 6 (op), 7,8 (res only)
    assert unet["input_blocks.0.0.weight"].shape == (32, 4, 3, 3)
    assert unet["input_blocks.3.0.op.weight"].shape == (32, 32, 3, 3)
    assert "input_blocks.5.1.proj_in.weight" in unet and "input_blocks.7.1.proj_in.weight" not in unet
    assert unet["input_blocks.4.0.skip_connection.weight"].shape == (64, 32, 1, 1)
    assert "middle_block.1.transformer_blocks.0.attn2.to_k.weight" in unet
    assert unet["output_blocks.2.1.conv.weight"].shape == (64, 64, 3, 3)  # UpBlock2D: upsampler at .1
    assert unet["output_blocks.5.2.conv.weight"].shape == (64, 64, 3, 3)  # cross-attn block: upsampler at .2
    assert "output_blocks.8.1.transformer_blocks.0.ff.net.2.weight" in unet
    assert unet["output_blocks.8.0.skip_connection.weight"].shape == (32, 64, 1, 1)
    assert {"time_embed.0.weight", "time_embed.2.weight", "out.0.weight", "out.2.weight",
            "output_blocks.0.0.emb_layers.1.weight", "output_blocks.0.0.in_layers.2.weight",
            "output_blocks.0.0.out_layers.3.weight"} <= set(unet)
    vae = {k[len(sf.VAE_PREFIX):]: v for k, v in ldm.items() if k.startswith(sf.VAE_PREFIX)}
    assert vae["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # Linear → 1×1 conv
    assert vae["decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert vae["encoder.down.0.downsample.conv.weight"].shape == (32, 32, 3, 3)
    assert "encoder.down.1.downsample.conv.weight" not in vae
    # the decoder's LDM levels count from the highest resolution: up.0 is diffusers' last up block
    assert vae["decoder.up.0.block.0.nin_shortcut.weight"].shape == (32, 64, 1, 1)
    assert vae["decoder.up.1.upsample.conv.weight"].shape == (64, 64, 3, 3)
    assert {"encoder.norm_out.weight", "decoder.mid.block_2.conv2.bias", "quant_conv.weight",
            "post_quant_conv.bias"} <= set(vae)
    assert f"{sf.TEXT_PREFIX}text_model.final_layer_norm.weight" in ldm


def test_split_gives_back_the_original_state_dicts(tiny):
    ckpt = sf.read_single_file(tiny["path"])
    assert ckpt.components == ["text_encoder", "unet", "vae"] and not ckpt.ignored and not ckpt.unexpected
    parts = sf.split_ldm_checkpoint(ckpt.state, tiny["configs"]["unet"], tiny["configs"]["vae"])
    states = tiny["states"]
    _assert_same_state(parts["unet"], states["unet"], "unet")
    _assert_same_state(parts["vae"], states["vae"], "vae")
    _assert_same_state(parts["text_encoder"], {f"text_model.{k}": v for k, v in states["text_encoder"].items()},
                       "text encoder")
    plain = sf.split_ldm_checkpoint(ckpt.state, tiny["configs"]["unet"], tiny["configs"]["vae"], text_prefix="")
    _assert_same_state(plain["text_encoder"], states["text_encoder"], "text encoder without prefix")


def test_diffusers_single_file_loaders_read_our_file_identically(tiny, torch):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
    from transformers import CLIPTextModel

    kwargs = dict(config=tiny["config_dir"], local_files_only=True, low_cpu_mem_usage=False)
    unet = UNet2DConditionModel.from_single_file(tiny["path"], subfolder="unet", **kwargs)
    vae = AutoencoderKL.from_single_file(tiny["path"], subfolder="vae", **kwargs)
    text = create_diffusers_clip_model_from_ldm(CLIPTextModel, load_single_file_checkpoint(tiny["path"]),
                                                subfolder="text_encoder", config=tiny["config_dir"],
                                                local_files_only=True)
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        _assert_same_state({k: v.numpy() for k, v in model.state_dict().items()}, tiny["states"][name], name)


def test_text_encoder_split_loads_into_transformers(tiny, torch, tmp_path):
    from transformers import CLIPTextModel

    parts = sf.split_ldm_checkpoint(sf.read_single_file(tiny["path"]).state, tiny["configs"]["unet"],
                                    tiny["configs"]["vae"])
    tiny["models"]["text_encoder"].config.save_pretrained(str(tmp_path))
    write_safetensors(parts["text_encoder"], str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, info = CLIPTextModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _assert_same_state({k: v.numpy() for k, v in model.state_dict().items()}, tiny["states"]["text_encoder"],
                       "transformers CLIPTextModel")


def test_vae_from_single_file_equals_vae_from_folder(tiny, tmp_path):
    from dynamicid_jax.models import vae as V

    tiny["models"]["vae"].save_pretrained(str(tmp_path), safe_serialization=True)
    _, from_folder = V.load_vae(str(tmp_path))
    parts = sf.load_single_file_components(tiny["path"], tiny["configs"]["unet"], tiny["configs"]["vae"])
    _, from_file = V.vae_from_state_dict(parts["vae"], tiny["configs"]["vae"], source=tiny["path"])
    flat_a, flat_b = (sorted(V.export_vae_state_dict(p).items()) for p in (from_folder, from_file))
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(flat_a, flat_b))


def test_sd15_configs_build_the_real_models(torch):
    """The built-in configs give diffusers / transformers models of SD1.5's exact sizes, whose LDM names are
    those of the released v1.5 files."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = sf.sd15_configs()
    configs["unet"]["block_out_channels"][0] = 0  # a copy: the module constants stay intact
    assert sf.SD15_UNET_CONFIG["block_out_channels"][0] == 320
    configs = sf.sd15_configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    sizes = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert sizes == [859_520_964, 83_653_863, 123_060_480]
    sched = PNDMScheduler.from_config(configs["scheduler"])
    assert sched.config.steps_offset == 1 and sched.config.beta_schedule == "scaled_linear"
    assert DDIMScheduler.from_config(configs["scheduler"]).config.set_alpha_to_one is False
    ldm = sf.to_ldm_checkpoint(unet.state_dict(), vae.state_dict(), text.state_dict())  # default: SD1.5 configs
    assert len(ldm) == 686 + 248 + 196
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    for key, shape in {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.input_blocks.11.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    }.items():
        assert shapes[key] == shape, key
    assert "model.diffusion_model.input_blocks.11.1.proj_in.weight" not in shapes  # DownBlock2D has no attention
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in shapes


def _write(path, state, metadata=None):
    write_safetensors(state, str(path), metadata)
    return str(path)


def test_read_single_file_skips_non_weights_and_widens(tiny, tmp_path):
    state = dict(tiny["ldm"])
    extra = {"model_ema.decay": np.array(0.9999, np.float32), "model_ema.num_updates": np.array(5, np.int64),
             "model_ema.diffusion_modelout2weight": np.zeros((4, 32, 3, 3), np.float32),
             "alphas_cumprod": np.linspace(1, 0, 1000).astype(np.float32), "betas": np.zeros(1000, np.float32),
             "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(77)[None]}
    key = "model.diffusion_model.out.2.weight"
    halves = {k: (v.astype(np.float16) if i % 2 else v.astype(ml_dtypes.bfloat16))
              for i, (k, v) in enumerate(state.items())}
    path = _write(tmp_path / "mixed.safetensors", {**halves, **extra}, {"modelspec.title": "tiny"})
    ckpt = sf.read_single_file(path)
    assert sorted(ckpt.ignored) == sorted(extra) and not ckpt.unexpected
    assert ckpt.metadata == {"modelspec.title": "tiny"}
    assert ckpt.state[key].dtype == np.float32
    assert np.array_equal(ckpt.state[key], np.asarray(halves[key]).astype(np.float32))
    parts = sf.split_ldm_checkpoint(ckpt.state, tiny["configs"]["unet"], tiny["configs"]["vae"])
    assert sorted(parts["unet"]) == sorted(tiny["states"]["unet"])
    # the split itself also skips non-weight keys it is handed
    raw = {**state, **extra}
    assert sorted(sf.split_ldm_checkpoint(raw, tiny["configs"]["unet"], tiny["configs"]["vae"])["vae"]) == \
        sorted(tiny["states"]["vae"])


def test_read_single_file_reports_unexpected_keys(tiny, tmp_path):
    stray = {"cond_stage_model.model.transformer.resblocks.0.ln_1.weight": np.zeros(4, np.float32),
             "lora_unet_down_blocks_0.alpha": np.zeros((), np.float32)}
    path = _write(tmp_path / "stray.safetensors", {**tiny["ldm"], **stray})
    with pytest.raises(WeightLoadError, match=r"(?s)2 key\(s\).*cond_stage_model\.model.*lora_unet"):
        sf.read_single_file(path)
    lenient = sf.read_single_file(path, strict=False)
    assert lenient.unexpected == sorted(stray) and len(lenient.state) == len(tiny["ldm"])


def test_read_single_file_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sf.read_single_file(str(tmp_path / "missing.safetensors"))
    with pytest.raises(IsADirectoryError, match="folder"):
        sf.read_single_file(str(tmp_path))
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02")
    with pytest.raises(WeightLoadError, match="safetensors"):
        sf.read_single_file(str(tmp_path / "old.ckpt"))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightLoadError, match="not a .safetensors file"):
        sf.read_single_file(str(tmp_path / "junk.safetensors"))
    other = _write(tmp_path / "diffusers.safetensors", {"conv_in.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(WeightLoadError, match="not an original-LDM"):
        sf.read_single_file(other, strict=False)


def test_legacy_text_names_and_missing_components(tiny):
    ldm = tiny["ldm"]
    legacy = {k.replace("transformer.text_model.", "transformer."): v for k, v in ldm.items()}
    assert "cond_stage_model.transformer.embeddings.token_embedding.weight" in legacy
    parts = sf.split_ldm_checkpoint(legacy, tiny["configs"]["unet"], tiny["configs"]["vae"])
    assert sorted(parts["text_encoder"]) == sorted(f"text_model.{k}" for k in tiny["states"]["text_encoder"])
    no_vae = {k: v for k, v in ldm.items() if not k.startswith(sf.VAE_PREFIX)}  # like a "noVAE" release
    parts = sf.split_ldm_checkpoint(no_vae, tiny["configs"]["unet"], tiny["configs"]["vae"])
    assert parts["vae"] == {} and len(parts["unet"]) == len(tiny["states"]["unet"])


def test_split_errors_name_the_offending_keys(tiny):
    unet_cfg, vae_cfg = tiny["configs"]["unet"], tiny["configs"]["vae"]
    ldm = dict(tiny["ldm"])
    extra = {**ldm, "model.diffusion_model.input_blocks.99.0.in_layers.0.weight": np.zeros(3, np.float32)}
    with pytest.raises(WeightLoadError, match=r"input_blocks\.99\.0\.in_layers\.0\.weight"):
        sf.split_ldm_checkpoint(extra, unet_cfg, vae_cfg)
    odd = {**ldm, "first_stage_model.encoder.mid.attn_1.qkv.weight": np.zeros(3, np.float32)}
    with pytest.raises(WeightLoadError, match=r"mid\.attn_1\.qkv\.weight"):
        sf.split_ldm_checkpoint(odd, unet_cfg, vae_cfg)
    gap = {k: v for k, v in ldm.items() if ".output_blocks.5.2." not in k}
    with pytest.raises(WeightLoadError, match=r"config with no weights(?s:.*)output_blocks\.5\.2\.conv"):
        sf.split_ldm_checkpoint(gap, unet_cfg, vae_cfg)
    with pytest.raises(WeightLoadError, match="belong to no SD1.x component"):
        sf.split_ldm_checkpoint({**ldm, "conditioner.embedders.0.foo": np.zeros(1)}, unet_cfg, vae_cfg)
    # the SD1.5 default config does not fit the tiny file
    with pytest.raises(WeightLoadError, match="does not match the config's layout"):
        sf.split_ldm_checkpoint(ldm)


def test_inverse_errors_and_unsupported_configs(tiny):
    unet_cfg, vae_cfg = tiny["configs"]["unet"], tiny["configs"]["vae"]
    with pytest.raises(WeightLoadError, match=r"down_blocks\.0\.resnets\.0\.bogus\.weight"):
        sf.to_ldm_checkpoint({"down_blocks.0.resnets.0.bogus.weight": np.zeros(1)}, None, None, unet_cfg, vae_cfg)
    with pytest.raises(WeightLoadError, match="text_projection"):
        sf.to_ldm_checkpoint(None, None, {"text_projection.weight": np.zeros((2, 2))}, unet_cfg, vae_cfg)
    with pytest.raises(ValueError, match="addition_embed_type"):
        sf.unet_modules({**unet_cfg, "addition_embed_type": "text_image"})  # "text_time" (SDXL) is supported
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        sf.unet_modules({**unet_cfg, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D",
                                                          "DownBlock2D"]})
    with pytest.raises(ValueError, match="layers_per_block"):
        sf.unet_modules({**unet_cfg, "layers_per_block": [1, 2, 2]})
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        sf.vae_modules({**vae_cfg, "down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]})
    without_attention = sf.vae_modules({**vae_cfg, "mid_block_add_attention": False})
    assert not any("attn" in m.ldm for m in without_attention)


def test_configs_are_json_serialisable():
    for name, config in sf.sd15_configs().items():
        assert json.loads(json.dumps(config)) == config, name
