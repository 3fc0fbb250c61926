"""SDXL backbone: parity with diffusers / transformers on a tiny SDXL-shaped model, single-file SDXL checkpoints,
the SDXL pipeline end to end, the CLI's backbone choice. (Full-size shapes: tests/test_sdxl_train.py.)"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from dynamicid_jax.models import unet as U
from dynamicid_jax.weights import keymap as km
from dynamicid_jax.weights import single_file_sdxl as sfx

PROMPT = "a photo of an astronaut riding a horse"


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory, torch):
    """``(folder, diffusers StableDiffusionXLPipeline)`` of the tiny random SDXL (tests/tiny_sdxl.py)."""
    from tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl")))


@pytest.fixture(scope="session")
def ours(tiny_sdxl):
    from dynamicid_jax.pipelines.stable_diffusion_xl import StableDiffusionXL

    return StableDiffusionXL.from_pretrained(tiny_sdxl[0], scheduler="euler")


def _state(folder, component):
    stem = "model" if component.startswith("text_encoder") else "diffusion_pytorch_model"
    return km.read_weights(os.path.join(folder, component), stem)[0]


def test_unet_parity_with_added_embeddings(tiny_sdxl, ours, torch):
    """SDXL-shaped UNet (transformer depths 1/2/3, linear projections, text_time embedding) vs diffusers, and
    its attention layers in diffusers' attn_processors order."""
    pipe = tiny_sdxl[1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([10, 700], np.int32)
    ctx = rng.standard_normal((2, 7, 64)).astype(np.float32)
    text = rng.standard_normal((2, 32)).astype(np.float32)
    ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 16, 32, 1024, 896]], np.float32)
    got = jax.jit(ours.unet.apply)({"params": ours.params["unet"]}, x, t, ctx, None,
                                   {"text_embeds": text, "time_ids": ids})
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t.astype(np.int64)),
                        torch.from_numpy(ctx), added_cond_kwargs={"text_embeds": torch.from_numpy(text),
                                                                  "time_ids": torch.from_numpy(ids)}).sample
    assert_close(got, ref.numpy().transpose(0, 2, 3, 1), what="SDXL UNet eps")
    theirs = [k.removesuffix(".processor") for k in pipe.unet.attn_processors]
    assert U.attention_layer_names(ours.unet.config) == theirs
    assert len(theirs) == 2 * (2 * 2 + 2 * 3 + 3 * 3 + 3 * 2 + 3)  # blocks × depth: down 2×2, 2×3; up 3×3, 3×2; mid 3


def test_text_encoders_match_encode_prompt(tiny_sdxl, ours, torch):
    """Both encoders and both tokenizers (tokenizer_2 pads with "!"): our penultimate-state concatenation and
    pooled projection equal diffusers' ``encode_prompt``."""
    pipe = tiny_sdxl[1]
    assert ours.tokenizer_2.pad_token == "!" and ours.tokenizer.pad_token == "<|endoftext|>"
    assert type(ours.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    context, pooled = ours.encode_prompts([PROMPT, "a cat"])
    with torch.no_grad():
        ref_ctx, _, ref_pooled, _ = pipe.encode_prompt([PROMPT, "a cat"], device="cpu",
                                                       do_classifier_free_guidance=False)
    assert context.shape == (2, 77, 64) and pooled.shape == (2, 32)
    assert_close(context, ref_ctx.numpy(), what="SDXL prompt embeds")
    assert_close(pooled, ref_pooled.numpy(), what="SDXL pooled prompt embeds")


def test_end_to_end_matches_diffusers_pipeline(tiny_sdxl, ours, torch):
    """10 Euler steps with CFG and micro-conditioning from the same start latents: images within 2e-3 of
    diffusers' StableDiffusionXLPipeline (output_type="np")."""
    pipe = tiny_sdxl[1]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(height=64, width=64, original_size=(96, 80), crops_coords_top_left=(8, 0), target_size=(64, 64))
    with torch.no_grad():
        ref = pipe(PROMPT, num_inference_steps=10, guidance_scale=5.0, latents=latents.clone(), output_type="np",
                   **kwargs).images
    got = ours.generate(PROMPT, steps=10, guidance_scale=5.0, latents=latents.numpy().transpose(0, 2, 3, 1),
                        output_type="float", **kwargs)
    assert got.shape == ref.shape == (1, 64, 64, 3)
    assert float(np.abs(got - ref).max()) <= 2e-3
    assert ours.num_compiled == 1


def test_single_file_written_in_original_layout_loads_and_equals_folder(tiny_sdxl, ours, tmp_path, torch):
    """A single file in SDXL's original layout (label_emb, conditioner.embedders.0.transformer.*, OpenCLIP
    ``.1.model.*`` with fused in_proj) written from the folder: diffusers' own converters read it back to the
    folder's weights, and our loader gives the folder's params exactly."""
    from diffusers.loaders import single_file_utils as dsf

    from dynamicid_jax.pipelines.stable_diffusion_xl import StableDiffusionXL
    from dynamicid_jax.weights.keymap import is_sdxl

    folder = tiny_sdxl[0]
    states = {c: _state(folder, c) for c in sfx.COMPONENTS}
    configs = {c: km.read_config(os.path.join(folder, c)) for c in ("unet", "vae")}
    ldm = sfx.to_sdxl_checkpoint(states["unet"], states["vae"], states["text_encoder"], states["text_encoder_2"],
                                 configs["unet"], configs["vae"])
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in ldm
    assert "model.diffusion_model.label_emb.0.0.weight" in ldm
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in ldm
    ldm["conditioner.embedders.1.model.logit_scale"] = np.ones((), np.float32)  # present in real files; ignored
    path = str(tmp_path / "tiny_sdxl.safetensors")
    km.write_safetensors(ldm, path)

    # independent oracle: diffusers' conversion functions
    ck = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ldm.items()}
    theirs = {"unet": dsf.convert_ldm_unet_checkpoint(ck, dict(tiny_sdxl[1].unet.config)),
              "text_encoder_2": dsf.convert_open_clip_checkpoint(tiny_sdxl[1].text_encoder_2, ck,
                                                                 prefix=sfx.TEXT_2_PREFIX)}
    for name, converted in theirs.items():
        assert sorted(converted) == sorted(k for k in states[name] if not k.endswith("position_ids")), name
        for k, v in converted.items():
            np.testing.assert_array_equal(v.numpy(), states[name][k], err_msg=f"{name}: {k}")

    assert is_sdxl(path) and is_sdxl(folder)
    loaded = StableDiffusionXL.from_pretrained(path, config=folder, scheduler="euler")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        flat_a = jax.tree_util.tree_leaves_with_path(loaded.params[part])
        flat_b = dict(jax.tree_util.tree_leaves_with_path(ours.params[part]))
        assert len(flat_a) == len(flat_b), part
        for p, v in flat_a:
            np.testing.assert_array_equal(np.asarray(v), np.asarray(flat_b[p]), err_msg=f"{part}{p}")
    assert loaded.unet.config == ours.unet.config and loaded.vae.config.scaling_factor == 0.13025


def test_openclip_round_trip_and_errors():
    """transformers ↔ OpenCLIP renaming is a bijection (q, k, v fused and split back); strays are named."""
    rng = np.random.default_rng(0)
    hf = {"text_projection.weight": rng.standard_normal((6, 4)).astype(np.float32),
          "text_model.embeddings.token_embedding.weight": rng.standard_normal((10, 4)).astype(np.float32)}
    for name in ("q_proj", "k_proj", "v_proj"):
        hf[f"text_model.encoder.layers.0.self_attn.{name}.weight"] = rng.standard_normal((4, 4)).astype(np.float32)
        hf[f"text_model.encoder.layers.0.self_attn.{name}.bias"] = rng.standard_normal(4).astype(np.float32)
    oc = sfx.transformers_to_openclip(hf)
    assert oc["transformer.resblocks.0.attn.in_proj_weight"].shape == (12, 4)
    np.testing.assert_array_equal(oc["text_projection"], hf["text_projection.weight"].T)
    back = sfx.openclip_to_transformers(oc)
    assert sorted(back) == sorted(hf) and all(np.array_equal(back[k], hf[k]) for k in hf)
    with pytest.raises(km.WeightLoadError, match="resblocks.0.attn.bogus"):
        sfx.openclip_to_transformers({"transformer.resblocks.0.attn.bogus.weight": np.zeros(1)})
    with pytest.raises(km.WeightLoadError, match=r"only \['q'\]"):
        sfx.transformers_to_openclip({"text_model.encoder.layers.0.self_attn.q_proj.weight": np.zeros((2, 2))})
    with pytest.raises(km.WeightLoadError, match="no SDXL component"):
        sfx.split_sdxl_checkpoint({"lora_unet_down.weight": np.zeros(1)})


def test_unet_added_cond_errors():
    cfg = U.unet_config("tiny-sdxl")
    unet = U.UNet2DConditionModel(cfg)
    x, t, ctx = jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 3, 64))
    with pytest.raises(ValueError, match="needs added_cond"):
        jax.eval_shape(unet.init, jax.random.key(0), x, t, ctx)
    with pytest.raises(ValueError, match=r"text_embeds must be \[1, 32\]"):
        jax.eval_shape(unet.init, jax.random.key(0), x, t, ctx, None,
                       {"text_embeds": jnp.zeros((1, 31)), "time_ids": jnp.zeros((1, 6))})
    plain = U.UNet2DConditionModel(U.unet_config("tiny"))
    with pytest.raises(ValueError, match="only for UNets with addition_embed_type"):
        jax.eval_shape(plain.init, jax.random.key(0), jnp.zeros((1, 4, 4, 4)), t, jnp.zeros((1, 3, 32)), None,
                       U.dummy_added_cond(cfg))
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        U.UNetConfig.from_dict({**sfx.SDXL_UNET_CONFIG, "projection_class_embeddings_input_dim": None})


def test_cli_picks_sdxl_backbone_from_folder(tiny_sdxl, tmp_path, monkeypatch):
    """``infer.generate --model SDXL_FOLDER`` builds StableDiffusionXL (1024² by default) and writes the PNG.
    Sampling itself is the end-to-end test's; here ``generate`` is recorded instead of run, to keep the suite fast.
    (The identity methods on SDXL from the CLI: tests/test_sdxl_pipelines.py.)"""
    from dynamicid_jax.pipelines.stable_diffusion_xl import StableDiffusionXL
    from infer import generate

    calls = []

    def fake_generate(self, prompts, negative_prompt=None, **kwargs):
        calls.append((type(self).__name__, kwargs))
        self.last_timings = {"run_s": 1.0}
        return np.zeros((len(prompts), 8, 8, 3), np.uint8)

    monkeypatch.setattr(StableDiffusionXL, "generate", fake_generate)
    out = tmp_path / "out.png"
    assert generate.main(["--model", tiny_sdxl[0], "--prompt", "a cat", "--steps", "3", "--out", str(out)]) == 0
    assert out.is_file()
    assert calls[0][0] == "StableDiffusionXL" and calls[0][1]["height"] == calls[0][1]["width"] == 1024
