"""CLIP text / vision towers against transformers (tiny random models saved in the real format), the key maps,
the loaders' errors, full-size shapes and CLIP image preprocessing."""
import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from safetensors.numpy import load_file, save_file

from dynamicid_jax.models import clip
from dynamicid_jax.weights.keymap import WeightLoadError, count_params, export_state_dict, load_state_dict

TEXT_KW = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=77, bos_token_id=0, pad_token_id=1)
VISION_KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                 patch_size=4, projection_dim=48, hidden_act="gelu")


def _text_ids(rng, batch, eos, length=77):
    """Token rows: BOS, random tokens, EOS, then EOS padding (as the SD tokenizer pads)."""
    ids = np.full((batch, length), eos, np.int64)
    for b in range(batch):
        n = rng.integers(3, 60)
        ids[b, 0] = 0
        ids[b, 1:n] = rng.integers(3, 1000, n - 1)
        ids[b, n] = eos
    return ids


def _torch_text(torch, folder, eos_token_id, hidden_act, seed):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(eos_token_id=eos_token_id, hidden_act=hidden_act, **TEXT_KW)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def text_case(torch, tmp_path_factory):
    """eos_token_id=2 (the legacy value in SD1.5's config → argmax pooling), quick_gelu."""
    folder = tmp_path_factory.mktemp("clip_text")
    model = _torch_text(torch, folder, eos_token_id=2, hidden_act="quick_gelu", seed=0)
    rng = np.random.default_rng(0)
    ids = _text_ids(rng, 3, eos=999)
    ids[:, 1] = 2  # a token equal to eos_token_id before the real end: "first == eos" pooling would pick it
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    return folder, ids, out


@pytest.fixture(scope="session")
def text_case_eos(torch, tmp_path_factory):
    """eos_token_id=500 (new-style config → first EOS position), gelu; larger ids follow the EOS."""
    folder = tmp_path_factory.mktemp("clip_text_eos")
    model = _torch_text(torch, folder, eos_token_id=500, hidden_act="gelu", seed=1)
    rng = np.random.default_rng(1)
    ids = _text_ids(rng, 3, eos=500)
    ids[ids == 500] = 499
    for b, pos in enumerate((5, 20, 40)):
        ids[b, pos] = 500
        ids[b, pos + 1:] = 900 + b  # argmax pooling would pick one of these
    with torch.no_grad():
        out = model(torch.from_numpy(ids))
    return folder, ids, out


@pytest.fixture(scope="session")
def vision_case(torch, tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("clip_vision")
    torch.manual_seed(2)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_KW)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    pixels = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), output_hidden_states=True)
    return folder, pixels.transpose(0, 2, 3, 1), out


@pytest.fixture(scope="session")
def loaded_text(text_case):
    return clip.load_text_encoder(text_case[0])


@pytest.fixture(scope="session")
def loaded_vision(vision_case):
    return clip.load_image_encoder(vision_case[0])


# ------------------------------------------------------------------------------------------------ parity
def test_text_parity_legacy_eos(text_case, loaded_text):
    _, ids, ref = text_case
    model, params = loaded_text
    assert model.config.eos_token_id == 2 and model.config.hidden_act == "quick_gelu"
    out = jax.jit(lambda p, x: model.apply({"params": p}, x, output_hidden_states=True))(params, ids)
    assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), 1e-4, 0, "text last_hidden_state")
    assert_close(out.pooler_output, ref.pooler_output.numpy(), 1e-4, 0, "text pooler_output (argmax)")
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        assert_close(a, b.numpy(), 1e-4, 0, f"text hidden_states[{i}]")


def test_text_parity_first_eos(text_case_eos):
    folder, ids, ref = text_case_eos
    model, params = clip.load_text_encoder(folder)
    assert model.config.eos_token_id == 500 and model.config.hidden_act == "gelu"
    out = jax.jit(model.apply)({"params": params}, ids)
    assert out.hidden_states is None
    assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), 1e-4, 0, "text last_hidden_state")
    assert_close(out.pooler_output, ref.pooler_output.numpy(), 1e-4, 0, "text pooler_output (first eos)")
    # the pooled row really is the first-EOS row, not the argmax row
    assert_close(out.pooler_output, np.asarray(out.last_hidden_state)[np.arange(3), [5, 20, 40]], 0, 0, "rows")


def test_vision_parity(vision_case, loaded_vision):
    _, pixels, ref = vision_case
    model, params = loaded_vision
    out = jax.jit(model.apply)({"params": params}, pixels)
    assert len(out.hidden_states) == len(ref.hidden_states) == VISION_KW["num_hidden_layers"] + 1
    assert out.hidden_states[-2].shape == (2, 65, 64)
    assert_close(out.hidden_states[-2], ref.hidden_states[-2].numpy(), 1e-4, 0, "vision penultimate hidden")
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        assert_close(a, b.numpy(), 1e-4, 0, f"vision hidden_states[{i}]")
    assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), 1e-4, 0, "vision last_hidden_state")
    assert_close(out.image_embeds, ref.image_embeds.numpy(), 1e-4, 0, "image_embeds")


def test_bf16_compute(vision_case, loaded_vision):
    _, pixels, ref = vision_case
    model, params = clip.load_image_encoder(vision_case[0], dtype=jnp.bfloat16)
    out = jax.jit(model.apply)({"params": params}, pixels)
    assert out.image_embeds.dtype == jnp.bfloat16
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
    assert_close(out.image_embeds, ref.image_embeds.numpy(), 0.1, 0.05, "bf16 image_embeds")


# ------------------------------------------------------------------------------------------------ key maps
def test_text_keymap_round_trip(text_case, loaded_text):
    saved = load_file(str(text_case[0] / "model.safetensors"))
    exported = export_state_dict(loaded_text[1], clip.TEXT_KEYMAP)
    expected = clip.canonical_text_state(saved)
    assert sorted(exported) == sorted(expected)
    assert all(k.startswith("text_model.") for k in exported)
    for key, value in expected.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_vision_keymap_round_trip(vision_case, loaded_vision):
    saved = load_file(str(vision_case[0] / "model.safetensors"))
    exported = export_state_dict(loaded_vision[1], clip.VISION_KEYMAP)
    assert sorted(exported) == sorted(saved)
    assert exported["vision_model.embeddings.class_embedding"].shape == (64,)
    for key, value in saved.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_text_prefixed_layout_with_buffers(text_case, loaded_text, tmp_path):
    """The layout of SD checkpoints written by transformers 4: ``text_model.*`` plus a position_ids buffer."""
    saved = load_file(str(text_case[0] / "model.safetensors"))
    state = {"text_model." + k: v for k, v in saved.items()}
    state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(text_case[0] / "config.json", tmp_path / "config.json")
    _, params = clip.load_text_encoder(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded_text[1])


def test_sharded_checkpoint(torch, vision_case, loaded_vision, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(vision_case[0])
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    _, params = clip.load_image_encoder(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded_vision[1])


def test_full_clipmodel_folder(torch, tmp_path):
    """A full CLIPModel folder (the laion CLIP-H layout): each loader takes its tower; the top-level
    projection_dim sizes visual_projection."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(3)
    vision_kw = {k: v for k, v in VISION_KW.items() if k != "projection_dim"}
    config = CLIPConfig(text_config=dict(eos_token_id=999, **TEXT_KW), vision_config=vision_kw, projection_dim=40)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    pixels = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ids = _text_ids(np.random.default_rng(3), 2, eos=999)
    with torch.no_grad():
        tv = model.vision_model(torch.from_numpy(pixels), output_hidden_states=True)
        ref_embeds = model.visual_projection(tv.pooler_output).numpy()
        ref_text = model.text_model(torch.from_numpy(ids))
    vmodel, vparams = clip.load_image_encoder(tmp_path)
    assert vmodel.config.projection_dim == 40
    out = jax.jit(vmodel.apply)({"params": vparams}, pixels.transpose(0, 2, 3, 1))
    assert_close(out.image_embeds, ref_embeds, 1e-4, 0, "CLIPModel image_embeds")
    assert_close(out.hidden_states[-2], tv.hidden_states[-2].numpy(), 1e-4, 0, "CLIPModel penultimate")
    tmodel, tparams = clip.load_text_encoder(tmp_path)
    tout = jax.jit(tmodel.apply)({"params": tparams}, ids)
    assert_close(tout.pooler_output, ref_text.pooler_output.numpy(), 1e-4, 0, "CLIPModel text pooled")


# ------------------------------------------------------------------------------------------------ errors
def test_missing_and_hub_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip.load_text_encoder(tmp_path / "nope")
    with pytest.raises(ValueError, match="only local folders"):
        clip.load_image_encoder("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    with pytest.raises(FileNotFoundError, match="config.json"):
        clip.load_text_encoder(tmp_path)


def test_missing_weights(text_case, tmp_path):
    shutil.copy(text_case[0] / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin"):
        clip.load_text_encoder(tmp_path)


def test_wrong_shape_tensor(text_case, tmp_path):
    shutil.copytree(text_case[0], tmp_path, dirs_exist_ok=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["encoder.layers.1.mlp.fc1.weight"] = np.zeros((100, 64), np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"(?s)wrong-shape.*text_model\.encoder\.layers\.1\.mlp\.fc1\.weight"):
        clip.load_text_encoder(tmp_path)


def test_missing_and_unexpected_tensor(vision_case, tmp_path):
    shutil.copytree(vision_case[0], tmp_path, dirs_exist_ok=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["vision_model.extra.weight"] = state.pop("vision_model.embeddings.class_embedding")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"(?s)missing.*class_embedding.*unexpected.*vision_model\.extra"):
        clip.load_image_encoder(tmp_path)


def test_unknown_config_key(text_case, tmp_path):
    shutil.copytree(text_case[0], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["use_rotary_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"use_rotary_embeddings.*config\.json|config\.json.*use_rotary_embeddings"):
        clip.load_text_encoder(tmp_path)


def test_config_errors():
    with pytest.raises(ValueError, match="not a CLIP text config"):
        clip.CLIPTextConfig.from_dict({"model_type": "clip_vision_model", "hidden_size": 64})
    with pytest.raises(ValueError, match="unknown activation"):
        clip.CLIPTextConfig.from_dict({"hidden_act": "swiglu"})
    with pytest.raises(ValueError, match="not square"):
        clip.CLIPVisionConfig.from_dict({"image_size": [224, 256]})
    with pytest.raises(ValueError, match="unknown key"):
        clip.CLIPVisionConfig.from_dict({"model_type": "clip", "vision_config": {}, "mystery": 1})
    with pytest.raises(ValueError, match="unknown CLIP vision variant"):
        clip.vision_config("clip-g")
    legacy = clip.CLIPTextConfig.from_dict({"model_type": "clip", "text_config": {"hidden_size": 64},
                                            "text_config_dict": {"hidden_size": 128, "num_attention_heads": 8}})
    assert legacy.hidden_size == 128


# transformers-4 configs serialise every PretrainedConfig attribute into each tower config
_V4_GENERIC = {
    "_name_or_path": "", "add_cross_attention": False, "architectures": None, "bad_words_ids": None,
    "begin_suppress_tokens": None, "bos_token_id": None, "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None, "decoder_start_token_id": None, "diversity_penalty": 0.0,
    "do_sample": False, "dropout": 0.0, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
    "eos_token_id": None, "exponential_decay_length_penalty": None, "finetuning_task": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "id2label": {"0": "LABEL_0"},
    "initializer_factor": 1.0, "initializer_range": 0.02, "is_decoder": False, "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0}, "length_penalty": 1.0, "max_length": 20, "min_length": 0,
    "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False, "pad_token_id": None,
    "prefix": None, "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
    "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None,
    "suppress_tokens": None, "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False,
    "tie_encoder_decoder": False, "tie_word_embeddings": True, "tokenizer_class": None, "top_k": 50,
    "top_p": 1.0, "torch_dtype": None, "torchscript": False, "transformers_version": "4.24.0", "typical_p": 1.0,
    "use_bfloat16": False,
}


def test_v4_style_full_clip_h_config():
    """A transformers-4-era full CLIPModel config of the ViT-H/14 layout parses to the ``clip-h`` variant."""
    vision = {**_V4_GENERIC, "model_type": "clip_vision_model", "hidden_act": "gelu", "hidden_size": 1280,
              "image_size": 224, "intermediate_size": 5120, "layer_norm_eps": 1e-05, "num_attention_heads": 16,
              "num_channels": 3, "num_hidden_layers": 32, "patch_size": 14, "projection_dim": 512}
    text = {**_V4_GENERIC, "model_type": "clip_text_model", "hidden_act": "gelu", "hidden_size": 1024,
            "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
            "num_attention_heads": 16, "num_hidden_layers": 24, "projection_dim": 512, "vocab_size": 49408,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    full = {"_commit_hash": None, "architectures": ["CLIPModel"], "initializer_factor": 1.0,
            "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 1024, "text_config": text,
            "text_config_dict": {"hidden_act": "gelu"}, "vision_config": vision,
            "vision_config_dict": {"hidden_act": "gelu"}, "torch_dtype": "float32", "transformers_version": None}
    assert clip.CLIPVisionConfig.from_dict(full) == clip.vision_config("clip-h")  # top-level projection_dim wins
    text_cfg = clip.CLIPTextConfig.from_dict(full)
    assert (text_cfg.num_hidden_layers, text_cfg.hidden_size, text_cfg.eos_token_id) == (24, 1024, 2)


def test_bad_inputs(loaded_text, loaded_vision):
    model, params = loaded_vision
    with pytest.raises(ValueError, match=r"NHWC"):
        model.apply({"params": params}, jnp.zeros((1, 3, 32, 32)))
    tmodel, tparams = loaded_text
    with pytest.raises(ValueError, match="input_ids"):
        tmodel.apply({"params": tparams}, jnp.zeros((1, 78), jnp.int32))


# ------------------------------------------------------------------------------------------------ full size
def test_full_size_shapes():
    text = clip.CLIPTextModel(clip.text_config("sd15"))
    ids = jnp.zeros((2, 77), jnp.int32)
    abstract = jax.eval_shape(text.init, jax.random.key(0), ids)
    assert count_params(abstract["params"]) == 123_060_480
    out = jax.eval_shape(text.apply, abstract, ids)
    assert out.last_hidden_state.shape == (2, 77, 768) and out.pooler_output.shape == (2, 768)

    vision = clip.CLIPVisionModelWithProjection(clip.vision_config("clip-h"))
    pixels = jnp.zeros((2, 224, 224, 3), jnp.float32)
    abstract = jax.eval_shape(vision.init, jax.random.key(0), pixels)
    assert count_params(abstract["params"]) == 632_076_800
    out = jax.eval_shape(vision.apply, abstract, pixels)
    assert len(out.hidden_states) == 33
    assert out.hidden_states[-2].shape == (2, 257, 1280) and out.image_embeds.shape == (2, 1024)


def test_config_matches_transformers_defaults():
    from transformers import CLIPTextConfig

    ours = clip.CLIPTextConfig.from_dict(CLIPTextConfig(hidden_size=768, projection_dim=768,
                                                        intermediate_size=3072, num_attention_heads=12).to_dict())
    assert ours == clip.text_config("sd15")


# ------------------------------------------------------------------------------------------------ preprocess
def _hf_processor():
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls()


def _smooth_image(rng, h, w):
    from PIL import Image

    small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)).astype(np.int16)
    return np.clip(big + rng.integers(-20, 21, big.shape), 0, 255).astype(np.uint8)


# Measured: bit-identical (max abs diff 0.0) for uint8 input and for float [-1, 1] input of an 8-bit image (it
# rounds back to the same bytes); the tolerance only leaves room for float32 rounding on other platforms.
PREPROCESS_ATOL = 1e-6


@pytest.mark.parametrize("hw", [(300, 400), (400, 250), (224, 224), (100, 150), (181, 517)])
def test_clip_preprocess_matches_transformers(hw):
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    processor = _hf_processor()
    for image in (_smooth_image(rng, *hw), rng.integers(0, 256, (*hw, 3), dtype=np.uint8)):
        ref = processor(images=image, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        ours = clip.clip_preprocess(image)
        assert ours.shape == (1, 224, 224, 3) and ours.dtype == np.float32
        assert_close(ours, ref, PREPROCESS_ATOL, 0, f"uint8 {hw}")
        ours_float = clip.clip_preprocess(image.astype(np.float32) / 127.5 - 1.0)
        assert_close(ours_float, ref, PREPROCESS_ATOL, 0, f"float {hw}")


def test_clip_preprocess_inputs():
    from PIL import Image

    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(2))
    batch = clip.clip_preprocess(np.stack([a, b]))
    assert batch.shape == (2, 224, 224, 3)
    mixed = clip.clip_preprocess([Image.fromarray(a), b[:200]])
    np.testing.assert_allclose(mixed[0], batch[0], atol=1e-6)
    grey = clip.clip_preprocess(np.zeros((1, 64, 64, 3), np.float32))  # mid-grey in [-1, 1] → byte 128
    np.testing.assert_allclose(grey[0, 0, 0], (128 / 255 - np.array(clip.CLIP_MEAN)) / np.array(clip.CLIP_STD),
                               atol=1e-6)
    with pytest.raises(ValueError, match="RGB"):
        clip.clip_preprocess(np.zeros((1, 64, 64, 4), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        clip.clip_preprocess(np.zeros((64, 64, 3), np.int32))


# ------------------------------------------------------------------------------------------------ full size, slow
def _full_size_case(torch, tower, rng):
    """(our model, its input, key map, torch state dict as numpy, {name: (output getter, expected)})."""
    import transformers

    torch.manual_seed(0)
    if tower == "text-sd15":
        config = dataclasses.replace(clip.text_config("sd15"), eos_token_id=2)  # SD1.5's (legacy) value
        fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id", "projection_dim")
        ref_model = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**{f: getattr(config, f) for f in fields})).eval()
        ids = np.full((2, 77), 49407, np.int64)
        ids[:, 0] = 49406
        ids[0, 1:9], ids[1, 1:30] = rng.integers(0, 49406, 8), rng.integers(0, 49406, 29)
        with torch.no_grad():
            ref = ref_model(torch.from_numpy(ids))
        state = clip.canonical_text_state({k: v.numpy() for k, v in ref_model.state_dict().items()})
        checks = {"last_hidden_state": (lambda o: o.last_hidden_state, ref.last_hidden_state),
                  "pooler_output": (lambda o: o.pooler_output, ref.pooler_output)}
        return clip.CLIPTextModel(config), ids, clip.TEXT_KEYMAP, state, checks
    config = clip.vision_config("clip-h")
    ref_model = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**dataclasses.asdict(config))).eval()
    pixels = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(pixels), output_hidden_states=True)
    state = clip.canonical_vision_state({k: v.numpy() for k, v in ref_model.state_dict().items()})
    checks = {"penultimate": (lambda o: o.hidden_states[-2], ref.hidden_states[-2]),
              "image_embeds": (lambda o: o.image_embeds, ref.image_embeds)}
    return clip.CLIPVisionModelWithProjection(config), pixels.transpose(0, 2, 3, 1), clip.VISION_KEYMAP, state, checks


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["text-sd15", "vision-clip-h"])
def test_full_size_parity(torch, tower):
    """Random-weight CLIP-L text / CLIP-H vision at full size against transformers (CPU: ~3 min, ~6.5 GB RAM).

    Measured max abs diff: text last hidden 6.0e-6, pooled 4.9e-6; CLIP-H penultimate 4.1e-6, image_embeds 4.3e-6.
    """
    model, inputs, keymap, state, checks = _full_size_case(torch, tower, np.random.default_rng(7))
    abstract = jax.eval_shape(model.init, jax.random.key(0), inputs)["params"]
    params = load_state_dict(state, keymap, abstract, source=tower)
    del state
    out = jax.jit(model.apply)({"params": params}, inputs)
    for what, (get, expected) in checks.items():
        assert_close(get(out), expected.numpy(), 1e-4, 1e-4, f"{tower} {what}")
