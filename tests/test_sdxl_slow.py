"""Full-size SDXL parity on random weights (``make test-slow``): UNet ε, both text encoders and the VAE vs
diffusers / transformers in fp32, ≤ 1e-4 relative (plus a small absolute floor for values near zero).

Memory: the UNet test writes the torch model as a diffusers folder, frees it, then loads the folder tensor by tensor
(``LazyStateDict`` + ``place``), so the two 10 GB fp32 copies are never alive together (measured peak RSS 21 GB,
2 min 25 s on a 2-core, 24 GB machine); the bigG text encoder ≈ 9 GB, CLIP-L and the VAE ≈ 2 GB. Each test builds
its own models."""
import gc

import jax
import numpy as np
import pytest

from conftest import assert_close
from dynamicid_jax.weights import single_file_sdxl as sfx

pytestmark = pytest.mark.slow


def _perturb(model, torch, scale=0.02):
    """diffusers zero-inits some output layers: randomise every param so each path matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def _numpy_state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_full_size_unet_parity(torch, tmp_path):
    """The full SDXL UNet (2.6 B params, random weights) saved by diffusers and loaded by ``load_unet`` predicts
    the same ε as diffusers' own model, ≤ 1e-4 relative in fp32."""
    from diffusers import UNet2DConditionModel

    from dynamicid_jax.models import unet as U

    torch.manual_seed(0)
    config = {k: v for k, v in sfx.SDXL_UNET_CONFIG.items() if k != "_class_name"}
    model = UNet2DConditionModel(**config).eval()
    _perturb(model, torch, 0.005)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 32, 32, 4)).astype(np.float32)  # 256² images: full weights, small activations
    t = np.array([601], np.int32)
    ctx = rng.standard_normal((1, 77, 2048)).astype(np.float32)
    text = rng.standard_normal((1, 1280)).astype(np.float32)
    ids = np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t.astype(np.int64)),
                    torch.from_numpy(ctx), added_cond_kwargs={"text_embeds": torch.from_numpy(text),
                                                              "time_ids": torch.from_numpy(ids)}).sample
    ref = ref.numpy().transpose(0, 2, 3, 1)
    model.save_pretrained(tmp_path / "unet")
    del model
    gc.collect()
    unet, params = U.load_unet(str(tmp_path / "unet"))
    assert tuple(unet.config.transformer_layers_per_block) == (1, 2, 10)
    got = jax.jit(unet.apply)({"params": params}, x, t, ctx, None, {"text_embeds": text, "time_ids": ids})
    assert_close(got, ref, atol=1e-4 * float(np.abs(ref).max()), rtol=1e-4, what="full-size SDXL UNet eps")


@pytest.mark.parametrize("name", ["text_encoder", "text_encoder_2"])
def test_full_size_text_encoder_parity(torch, name):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dynamicid_jax.models import clip as C

    ids = np.zeros((2, 77), np.int32)
    ids[:, 0] = 49406
    ids[0, 1:6], ids[0, 6] = [320, 1125, 539, 550, 3309], 49407
    ids[1, 1], ids[1, 2:] = 2368, [49407] + [0] * 74  # tokenizer 2's "!" padding
    with_projection = name == "text_encoder_2"
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    raw = sfx.sdxl_configs()[name]  # one encoder per test case: the bigG tower alone peaks near 9 GB of RAM
    torch.manual_seed(1)
    model = cls(CLIPTextConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")}))
    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    ours, params = C.text_encoder_from_state_dict(_numpy_state(model), raw, with_projection=with_projection)
    out = jax.jit(lambda p, i: ours.apply({"params": p}, i, output_hidden_states=True))(params, ids)
    penultimate = ref.hidden_states[-2].numpy()
    assert_close(out.hidden_states[-2], penultimate, atol=1e-4 * float(np.abs(penultimate).max()), rtol=1e-4,
                 what=f"{name} penultimate")
    if with_projection:
        embeds = ref.text_embeds.numpy()
        assert_close(out.text_embeds, embeds, atol=1e-4 * float(np.abs(embeds).max()), rtol=1e-4,
                     what=f"{name} pooled projection")


def test_full_size_vae_parity(torch):
    from diffusers import AutoencoderKL

    from dynamicid_jax.models import vae as V

    torch.manual_seed(2)
    config = {k: v for k, v in sfx.SDXL_VAE_CONFIG.items() if k != "_class_name"}
    model = AutoencoderKL(**config).eval()
    _perturb(model, torch, 0.005)
    rng = np.random.default_rng(2)
    z = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
    vae, params = V.vae_from_state_dict(_numpy_state(model), sfx.SDXL_VAE_CONFIG)
    assert vae.config.scaling_factor == 0.13025 and vae.config.force_upcast
    got = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="decode"))(params, z)
    assert_close(got, ref, atol=1e-4 * float(np.abs(ref).max()), rtol=1e-4, what="full-size SDXL VAE decode")
