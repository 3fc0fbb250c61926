"""SAA: parity with a PyTorch re-expression inside a diffusers UNet, the gate, routing, boost, importer, errors."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import tiny_sd
from conftest import assert_close
from dynamicid_jax.methods import saa as S
from dynamicid_jax.models import unet as U
from dynamicid_jax.models.attention import Attention, LayerInfo
from dynamicid_jax.weights import keymap as km
from dynamicid_jax.weights import official_saa as OS

RANK = 8
TEXT_LEN = 7
TWO_BOXES = [[0.1, 0.1, 0.5, 0.4], [0.1, 0.6, 0.5, 0.9]]  # the official two-ID example


# ---------------------------------------------------------------------------------------------------------
# fixtures: a tiny diffusers UNet with the reference processors, its SAA.bin, our UNet with the import
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def torch_unet(torch, tmp_path_factory):
    import torch_reference_saa as ref
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**tiny_sd.UNET).eval()
    with torch.no_grad():  # diffusers zero-inits some layers; perturb so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("saa_unet")
    model.save_pretrained(folder, safe_serialization=True)  # base weights, before the processors join
    model.set_attn_processor(ref.saa_processors(model, RANK))
    with torch.no_grad():  # non-zero LoRA ups and ID projections
        for proc in model.attn_processors.values():
            for name, p in proc.named_parameters():
                p.copy_(torch.randn_like(p) * (0.1 if ".up." in name else 0.15 if "_ip" in name else 1.0 / RANK))
    saa_module = torch.nn.ModuleList(model.attn_processors.values())
    torch.save({"proj_module": {}, "SAA_module": saa_module.state_dict()}, folder / "SAA.bin")
    return model, str(folder)


@pytest.fixture(scope="session")
def ours(torch_unet):
    """(SAA UNet, merged params, base UNet, base params, imported SAA params)."""
    base_unet, base_params = U.load_unet(torch_unet[1])
    saa_params = OS.load_official_saa(os.path.join(torch_unet[1], "SAA.bin"), base_unet.config)
    unet = U.UNet2DConditionModel(base_unet.config, strategy=S.SAA(lora_rank=RANK))
    return unet, S.merge_params(base_params, saa_params), base_unet, base_params, saa_params


@pytest.fixture(scope="session")
def apply_saa(ours):
    unet = ours[0]
    return jax.jit(lambda p, x, t, c, inp: unet.apply({"params": p}, x, t, c, inp, mutable=["intermediates"]))


def _batch(num_ids, hw=(16, 16), seed=0):
    """CFG-style batch: row 0 and row 1 have different contexts and timesteps."""
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((2,) + hw + (4,)).astype(np.float32)
    ctx = rng.standard_normal((2, TEXT_LEN + 4 * num_ids, 32)).astype(np.float32)
    return sample, np.array([20, 640], np.int32), ctx


def _torch_eps(torch, model, sample, t, ctx):
    with torch.no_grad():
        out = model(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(t.astype(np.int64)),
                    torch.from_numpy(ctx)).sample
    return out.numpy().transpose(0, 2, 3, 1)


CASES = {  # name: (num_ids, latent hw, our saa_inputs kwargs, reference settings)
    "one_id_whole_image": (1, (16, 16), dict(), dict(num_ids=1)),
    "two_ids_routed_boosted_nonsquare": (2, (16, 24), dict(boxes=TWO_BOXES, strength=2.0),
                                         dict(num_ids=2, boxes=TWO_BOXES, strength=2.0)),
    "two_ids_one_box_mixing": (2, (16, 16), dict(boxes=[[0.0, 0.25, 0.75, 1.0]], strength=1.0, mix=0.3),
                               dict(num_ids=2, boxes=[[0.0, 0.25, 0.75, 1.0]], strength=1.0, mix=0.3)),
    "activate_query_off": (2, (16, 16), dict(activate_query=False, strength=2.0),
                           dict(num_ids=2, activate_query=False, strength=2.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_torch_processors(case, torch, torch_unet, ours, apply_saa):
    import torch_reference_saa as ref

    model = torch_unet[0]
    unet, params, base_unet, base_params, _ = ours
    num_ids, hw, kwargs, settings = CASES[case]
    image_size = (8 * hw[0], 8 * hw[1])
    sample, t, ctx = _batch(num_ids, hw, seed=len(case))
    inputs = S.saa_inputs(num_ids, image_size, **kwargs)
    ref.configure_all(model, image_size=image_size, **settings)
    expected = _torch_eps(torch, model, sample, t, ctx)
    got, state = apply_saa(params, sample, t, ctx, inputs)
    assert_close(got, expected, atol=1e-4, rtol=1e-4, what=f"SAA UNet eps ({case})")
    print(f"\n{case}: max |ours - torch| = {float(np.abs(np.asarray(got) - expected).max()):.2e}")
    # the sown gates equal the reference's, layer by layer (processor order = attention_layer_names order)
    gates = {p: np.asarray(v[0]) for p, v in traverse_util.flatten_dict(state["intermediates"]).items()}
    names = U.attention_layer_names(unet.config)
    procs = list(model.attn_processors.values())
    assert len(gates) == len(names) // 2
    for name, proc in zip(names, procs):
        if name.endswith("attn2"):
            key = _flax_layer_path(name) + ("gate",)
            assert_close(gates[key], proc.last_gate.numpy(), atol=1e-5, rtol=1e-5, what=f"gate {name}")
    base = jax.jit(base_unet.apply)({"params": base_params}, sample, t, ctx[:, :TEXT_LEN])
    assert float(np.abs(np.asarray(got) - np.asarray(base)).max()) > 1e-2  # SAA did change the prediction
    all_gates = np.concatenate([g.ravel() for g in gates.values()])
    if kwargs.get("activate_query", True):
        assert (all_gates == 0).any()  # the threshold acted
        if kwargs.get("strength", 0) > 0:
            assert all_gates.max() >= kwargs["strength"]  # the boost acted
    else:
        assert (all_gates == 1).all()


def _flax_layer_path(name: str) -> tuple[str, ...]:
    parts, out = name.split("."), []
    for p in parts:
        if p.isdigit():
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    return tuple(out)
