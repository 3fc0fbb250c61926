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
from dynamicid_jax.pipelines.gates import gate_maps
from dynamicid_jax.models import unet as U
from dynamicid_jax.models.layers import Attention, LayerInfo
from dynamicid_jax.weights import keymap as km
from dynamicid_jax.methods import dynamicid_official as official

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
    saa_params = official.load_official_saa(os.path.join(torch_unet[1], "SAA.bin"), base_unet.config)
    unet = U.UNet2DConditionModel(base_unet.config, strategy=S.SAA(lora_rank=RANK))
    return unet, S.merge_params(base_params, saa_params), base_unet, base_params, saa_params


# XLA's backend optimisations dominate the compile time of a tiny UNet and buy nothing at these sizes
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn):
    """``jax.jit`` compiled with :data:`FAST` options, one executable per argument structure."""
    jitted, cache = jax.jit(fn), {}

    def call(*args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        key = (tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
        if key not in cache:
            cache[key] = jitted.lower(*args).compile(compiler_options=FAST)
        return cache[key](*args)

    return call


@pytest.fixture(scope="session")
def apply_saa(ours):
    unet = ours[0]
    return fast_jit(lambda p, x, t, c, inp: unet.apply({"params": p}, x, t, c, inp, mutable=["intermediates"]))


@pytest.fixture(scope="session")
def apply_base(ours):
    base_unet = ours[2]
    return fast_jit(lambda p, x, t, c: base_unet.apply({"params": p}, x, t, c))


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
    """ε of a diffusers UNet running the reference processors (weights saved as an official SAA.bin) equals ε of
    our UNet with the SAA strategy and the imported weights; the sown gates equal the reference's per layer."""
    import torch_reference_saa as ref

    model = torch_unet[0]
    unet, params = ours[0], ours[1]
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
    all_gates = np.concatenate([g.ravel() for g in gates.values()])
    if kwargs.get("activate_query", True):
        assert (all_gates == 0).any()  # the threshold acted
        if kwargs.get("strength", 0) > 0:
            assert all_gates.max() >= kwargs["strength"]  # the boost acted
    else:
        assert (all_gates == 1).all()
    ref.configure_all(model, image_size=image_size, **dict(settings, id_scale=0.0))  # (after reading last_gate)
    without_ids = _torch_eps(torch, model, sample, t, ctx)
    assert float(np.abs(expected - without_ids).max()) > 1e-2  # the ID branch matters at this tolerance


def _flax_layer_path(name: str) -> tuple[str, ...]:
    parts, out = name.split("."), []
    for p in parts:
        if p.isdigit():
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------
# layer order, official index table, importer
# ---------------------------------------------------------------------------------------------------------
def test_processor_order_matches_diffusers(torch_unet, ours):
    model = torch_unet[0]
    theirs = [k.removesuffix(".processor") for k in model.attn_processors]
    assert U.attention_layer_names(ours[0].config) == theirs
    # and the module list the official code saves follows the same order
    saved = official.saa_keymap(ours[0].config)
    assert saved.torch_key(_flax_layer_path(theirs[5]) + ("to_k_ip", "kernel")) == "5.to_k_ip.weight"


SD15_TABLE = [("down_blocks.0", 0, 4, 320), ("down_blocks.1", 4, 8, 640), ("down_blocks.2", 8, 12, 1280),
              ("up_blocks.1", 12, 18, 1280), ("up_blocks.2", 18, 24, 640), ("up_blocks.3", 24, 30, 320),
              ("mid_block", 30, 32, 1280)]


def test_sd15_index_table_and_sizes():
    """docs/method.md §4.6's SD1.5 table: 32 processors, their blocks, widths, attn1/attn2 alternation, param count."""
    cfg = U.unet_config("sd15")
    names = U.attention_layer_names(cfg)
    flat = traverse_util.flatten_dict(nn.meta.unbox(S.abstract_saa_params(cfg)))
    keymap = official.saa_keymap(cfg)
    by_key = {keymap.torch_key(p): v.shape for p, v in flat.items()}
    assert len(names) == 32
    for block, lo, hi, width in SD15_TABLE:
        for i in range(lo, hi):
            assert names[i].startswith(block + ".") and names[i].endswith("attn1" if i % 2 == 0 else "attn2")
            assert by_key[f"{i}.to_q_lora.down.weight"] == (width, 128)
            assert by_key[f"{i}.to_out_lora.up.weight"] == (128, width)
            src = width if i % 2 == 0 else 768
            assert by_key[f"{i}.to_k_lora.down.weight"] == (src, 128)
            assert (f"{i}.to_k_ip.weight" in by_key) == (i % 2 == 1)
            if i % 2:
                assert by_key[f"{i}.to_v_ip.weight"] == (768, width)
    assert len(by_key) == 16 * 8 + 16 * 10
    assert km.count_params(flat) == 44_679_168  # 12.78 M attn1 LoRA + 12.73 M attn2 LoRA + 19.17 M ip


def test_import_export_round_trip(torch_unet, ours):
    from dynamicid_jax.methods.dynamicid_official import read_saa_bin

    state = read_saa_bin(os.path.join(torch_unet[1], "SAA.bin"))["SAA_module"]
    saa_params = ours[4]
    for tree in (saa_params, ours[1]):  # SAA params alone, or merged with the base UNet's
        exported = official.export_saa(tree, ours[0].config)
        assert sorted(exported) == sorted(state)
        for k, v in state.items():
            np.testing.assert_array_equal(exported[k], v, err_msg=k)
    assert official.infer_saa_rank(state) == RANK
    again = official.import_saa({"proj_module": {}, "SAA_module": state}, ours[0].config)  # the whole SAA.bin dict
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(saa_params)):
        np.testing.assert_array_equal(a, b)


def test_import_errors_list_keys(torch_unet, ours):
    from dynamicid_jax.methods.dynamicid_official import read_saa_bin

    cfg = ours[0].config
    state = dict(read_saa_bin(os.path.join(torch_unet[1], "SAA.bin"))["SAA_module"])
    del state["3.to_v_ip.weight"]
    state["2.to_k_ip.weight"] = np.zeros((32, 32), np.float32)  # attn1 has no ID branch
    state["99.to_q_lora.down.weight"] = np.zeros((RANK, 64), np.float32)
    state["5.to_out_lora.up.weight"] = np.zeros((32, RANK), np.float32)  # layer 5 is 64 wide
    with pytest.raises(km.WeightLoadError) as e:
        official.import_saa(state, cfg, source="SAA.bin['SAA_module']")
    msg = str(e.value)
    for key in ("3.to_v_ip.weight", "2.to_k_ip.weight", "99.to_q_lora.down.weight", "5.to_out_lora.up.weight",
                "SAA.bin"):
        assert key in msg, key
    with pytest.raises(km.WeightLoadError, match="rank is 8"):
        official.import_saa(read_saa_bin(os.path.join(torch_unet[1], "SAA.bin")), cfg, strategy=S.SAA(lora_rank=4))
    with pytest.raises(km.WeightLoadError, match="no LoRA keys"):
        official.import_saa({"0.weight": np.zeros(3)}, cfg)


# ---------------------------------------------------------------------------------------------------------
# fresh init: id_scale = 0 and LoRA up = 0 reproduce the base UNet; init_ip_from_base
# ---------------------------------------------------------------------------------------------------------
def test_fresh_init_is_the_base_unet(ours, apply_saa, apply_base):
    unet, base_params = ours[0], ours[3]
    fresh = S.init_saa_params(unet.config, jax.random.key(3), S.SAA(lora_rank=RANK))
    flat = traverse_util.flatten_dict(fresh)
    assert set(flat) == set(traverse_util.flatten_dict(ours[4]))
    ups = [v for p, v in flat.items() if p[-2] == "up"]
    downs = np.concatenate([np.ravel(v) for p, v in flat.items() if p[-2] == "down"])
    assert all(float(jnp.abs(u).max()) == 0.0 for u in ups)
    assert abs(float(downs.std()) - 1.0 / RANK) < 0.1 / RANK
    params = S.merge_params(base_params, fresh)
    sample, t, ctx = _batch(1, seed=11)
    base = np.asarray(apply_base(base_params, sample, t, ctx[:, :TEXT_LEN]))
    off, _ = apply_saa(params, sample, t, ctx, S.saa_inputs(1, (128, 128), id_scale=0.0))
    assert_close(off, base, atol=1e-6, rtol=0, what="fresh SAA with id_scale=0 vs the base UNet")
    on, _ = apply_saa(params, sample, t, ctx, S.saa_inputs(1, (128, 128)))
    assert float(np.abs(np.asarray(on) - base).max()) > 1e-3  # the ID branch is live at id_scale=1
    # the training initialisation copies to_k / to_v into to_k_ip / to_v_ip
    trained_init = traverse_util.flatten_dict(S.init_ip_from_base(params))
    n = 0
    for path, value in trained_init.items():
        if path[-2] in ("to_k_ip", "to_v_ip"):
            np.testing.assert_array_equal(value, trained_init[path[:-2] + (path[-2][:-3], "kernel")])
            n += 1
    assert n == len(U.attention_layer_names(unet.config))  # two per cross-attention
    with pytest.raises(ValueError, match="base UNet params"):
        S.init_ip_from_base(fresh)


# ---------------------------------------------------------------------------------------------------------
# the gate (pure function)
# ---------------------------------------------------------------------------------------------------------
def test_gate_constant_logits_no_nan():
    w = S.gate_from_logits(jnp.full((2, 4, 64, 8), 0.7, jnp.float32))
    assert not bool(jnp.isnan(w).any()) and float(jnp.abs(w).max()) == 0.0


def test_gate_threshold_and_per_row():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 4, 100, 8)).astype(np.float32)
    w = np.asarray(S.gate_from_logits(logits, threshold=0.3, eps=1e-6))
    g = logits.astype(np.float64).sum(axis=(1, 3))
    norm = (g - g.min(1, keepdims=True)) / (g.max(1, keepdims=True) - g.min(1, keepdims=True) + 1e-6)
    below = norm < 0.3
    assert below.any() and (~below).any()
    assert (w[below] == 0).all()
    np.testing.assert_allclose(w[~below], norm[~below], rtol=1e-5)
    assert w.max() <= 1.0 and np.isclose(w.max(axis=1), 1.0, atol=1e-5).all()
    changed = logits.copy()
    changed[1] = changed[1] * 5.0 + 3.0  # the other CFG row
    w2 = np.asarray(S.gate_from_logits(changed))
    np.testing.assert_array_equal(w2[0], w[0])
    changed[0, :, 5] += 50.0  # a change in row 0 does change row 0's gate
    assert not np.array_equal(np.asarray(S.gate_from_logits(changed))[0], w[0])


# ---------------------------------------------------------------------------------------------------------
# boxes on grids
# ---------------------------------------------------------------------------------------------------------
def _official_grid_mask(box, query_len, height, width):
    """The official mapping, written out: square images use √L_q, others the image-size ratio; int() edges."""
    if height == width:
        gh = gw = int(np.sqrt(query_len))
    else:
        ratio = int(np.sqrt(width * height // query_len))
        gh, gw = height // ratio, width // ratio
    m = np.zeros((gh, gw), bool)
    y0, x0, y1, x1 = box
    m[int(y0 * gh):int(y1 * gh), int(x0 * gw):int(x1 * gw)] = True
    return m.reshape(-1)


@pytest.mark.parametrize("image_size,expected", [((512, 512), [(64, 64), (32, 32), (16, 16), (8, 8)]),
                                                 ((512, 768), [(64, 96), (32, 48), (16, 24), (8, 12)]),
                                                 ((768, 512), [(96, 64), (48, 32), (24, 16), (12, 8)])])
def test_boxes_on_grids(image_size, expected):
    grids = S.query_grids(image_size)
    assert list(grids[:4]) == expected
    boxes = [[0.1, 0.1, 0.5, 0.4], [0.55, 0.6, 0.93, 0.97], [0.0, 0.0, 1.0, 1.0 / 3]]
    for gh, gw in grids:
        assert S.layer_grid(gh * gw, image_size) == (gh, gw)
        masks = np.asarray(S.box_masks(S.box_edges(boxes, (gh, gw)), (gh, gw)))
        for b, m in zip(boxes, masks):
            np.testing.assert_array_equal(m, _official_grid_mask(b, gh * gw, *image_size))
    h, w = expected[0]
    assert S.box_edges([boxes[0]], (h, w)).tolist() == [[int(0.1 * h), int(0.1 * w), int(0.5 * h), int(0.4 * w)]]
    # Python-float truncation as the official code: 0.57 · 100 = 56.999… → 56
    assert S.box_edges([[0.57, 0.0, 1.0, 1.0]], (100, 100))[0, 0] == 56


def test_layouts():
    np.testing.assert_allclose(S.layout_boxes(1), [[0, 0, 1, 1]])
    np.testing.assert_allclose(S.layout_boxes(3), [[0, 0, 1, 1 / 3], [0, 1 / 3, 1, 2 / 3], [0, 2 / 3, 1, 1]])
    np.testing.assert_allclose(S.layout_boxes(3, [1, 2, 1]), [[0, 0, 1, .25], [0, .25, 1, .75], [0, .75, 1, 1]])
    np.testing.assert_allclose(S.layout_boxes(4, "grid"), [[0, 0, .5, .5], [0, .5, .5, 1], [.5, 0, 1, .5],
                                                            [.5, .5, 1, 1]])
    np.testing.assert_allclose(S.layout_boxes(3, "grid"), [[0, 0, .5, .5], [0, .5, .5, 1], [.5, 0, 1, 1]])
    for n, layout in ((2, "row"), (5, "grid"), (3, [3, 1, 1])):
        assert S.validate_boxes(S.layout_boxes(n, layout), n)[1] == "route"  # valid, disjoint, covering
    inputs = S.saa_inputs(3, (512, 768))  # no boxes for N ≥ 2 → equal strips
    np.testing.assert_allclose(np.asarray(inputs.boxes), S.layout_boxes(3), atol=1e-7)
    assert inputs.mode == "route" and inputs.box_edges.shape == (len(inputs.grids), 3, 4)
    assert S.saa_inputs(2, (512, 512), [[0, 0, 1, 1]]).mode == "mix"


# ---------------------------------------------------------------------------------------------------------
# one cross-attention layer: routing, boost, jit vs eager
# ---------------------------------------------------------------------------------------------------------
LAYER_BOXES = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]  # 4×4 grid: two 2×2 corners, 8 cells outside


def _layer(strategy):
    info = LayerInfo("mid_block.attentions.0.transformer_blocks.0.attn2", "cross", 31)
    return Attention(heads=2, head_dim=4, info=info, strategy=strategy)


def _layer_setup(strategy, seed=0):
    """A 4×4-query layer whose text branch is zero and whose output is ``w ⊙ h_id`` exactly: to_v = 0,
    to_out = I, LoRA up = 0, to_v_ip = I, and identity j's tokens carry a 1 in channel j (channels 0, 1 belong
    to head 0), so ``out[q, j]`` is w[q] times head 0's attention mass on identity j."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((2, 16, 8)).astype(np.float32)
    ids = rng.standard_normal((2, 8, 8)).astype(np.float32)
    ids[:, :, :2] = 0.0
    ids[:, :4, 0] = 1.0
    ids[:, 4:, 1] = 1.0
    context = np.concatenate([rng.standard_normal((2, 3, 8)).astype(np.float32), ids], axis=1)
    layer = _layer(strategy)
    inputs = S.saa_inputs(2, (32, 32), LAYER_BOXES, strength=1.0)
    params = nn.meta.unbox(layer.init(jax.random.key(seed), hidden, context, inputs))["params"]
    params = jax.tree_util.tree_map(np.asarray, params)
    params["to_v"]["kernel"] = np.zeros_like(params["to_v"]["kernel"])
    params["to_out_0"]["kernel"] = np.eye(8, dtype=np.float32)
    params["to_out_0"]["bias"] = np.zeros(8, np.float32)
    params["to_v_ip"]["kernel"] = np.eye(8, dtype=np.float32)
    return layer, params, hidden, context, inputs


def test_routing_inside_and_outside_boxes():
    layer, params, hidden, context, inputs = _layer_setup(S.SAA(lora_rank=2, threshold=-1.0))
    out, state = layer.apply({"params": params}, hidden, context, inputs, mutable=["intermediates"])
    out, gate = np.asarray(out), np.asarray(state["intermediates"]["gate"][0])
    in0 = np.asarray(S.box_masks(S.box_edges(LAYER_BOXES, (4, 4)), (4, 4)))
    box0, box1 = in0[0], in0[1]
    outside = ~(box0 | box1)
    assert box0.sum() == 4 and box1.sum() == 4 and outside.sum() == 8
    assert (gate[:, box0 | box1] >= 1.0).all()  # boosted: w·2/2 + 1
    assert (out[:, box0, 1] == 0).all() and (out[:, box0, 0] > 0).all()  # box 0 sees only identity 0
    assert (out[:, box1, 0] == 0).all() and (out[:, box1, 1] > 0).all()  # box 1 sees only identity 1
    live = outside[None] & (gate > 0)
    assert live.sum() >= 8
    assert (out[..., 0][live] > 0).all() and (out[..., 1][live] > 0).all()  # outside: both identities
    # the boost against the unboosted gate: w/(s+1) outside, w/(s+1)·(s+1) + s inside (s = 1)
    _, plain = layer.apply({"params": params}, hidden, context, inputs.replace(strength=jnp.float32(0.0)),
                           mutable=["intermediates"])
    plain = np.asarray(plain["intermediates"]["gate"][0])
    inside = box0 | box1
    np.testing.assert_array_equal(gate[:, outside], plain[:, outside] / np.float32(2))
    np.testing.assert_array_equal(gate[:, inside], plain[:, inside] / np.float32(2) * np.float32(2) + np.float32(1))
    # without the gate's routing (activate_query=False) box 0 sees identity 1 again
    off = layer.apply({"params": params}, hidden, context, inputs.replace(activate_query=False))
    assert (np.asarray(off)[:, box0, 1] > 0).all()


def test_boost_thresholded_in_box_query_ends_at_s_and_jit_equals_eager():
    layer, params, hidden, context, inputs = _layer_setup(S.SAA(lora_rank=2, threshold=2.0))  # all w → 0
    in_any = np.asarray(S.box_masks(S.box_edges(LAYER_BOXES, (4, 4)), (4, 4))).any(0)
    steps, boost_steps, strength = 6, 3, 2.0

    def one(step):
        out, state = layer.apply({"params": params}, hidden, context,
                                 S.saa_inputs_for_step(inputs, step, boost_steps, strength), mutable=["intermediates"])
        return out, state["intermediates"]["gate"][0]

    @jax.jit
    def looped():
        def body(i, acc):
            out, gate = one(i)
            return acc[0].at[i].set(out), acc[1].at[i].set(gate)
        return jax.lax.fori_loop(0, steps, body, (jnp.zeros((steps, 2, 16, 8)), jnp.zeros((steps, 2, 16))))

    outs, gates = jax.device_get(looped())
    for i in range(steps):
        out, gate = one(i)  # eager, Python int step
        s = strength if i < boost_steps else 0.0
        expected = np.where(in_any, s, 0.0)[None].repeat(2, 0)
        np.testing.assert_array_equal(np.asarray(gate), expected)  # thresholded in-box queries end at exactly s
        np.testing.assert_array_equal(gates[i], expected)
        assert_close(outs[i], out, atol=1e-6, rtol=1e-6, what=f"step {i}: jitted fori_loop vs eager")
    assert float(S.boost_strength(jnp.int32(2), 3, 2.0)) == 2.0 and float(S.boost_strength(3, 3, 2.0)) == 0.0
    np.testing.assert_array_equal(np.asarray(S.boost_gate(jnp.zeros((1, 3)), jnp.array([True, False, True]), 4.0)),
                                  [[4.0, 0.0, 4.0]])


def test_gate_maps_shapes(torch_unet, ours, apply_saa):
    sample, t, ctx = _batch(2, (16, 24), seed=5)
    _, state = apply_saa(ours[1], sample, t, ctx, S.saa_inputs(2, (128, 192), TWO_BOXES, strength=2.0))
    maps = gate_maps(state["intermediates"], (128, 192))
    assert maps["down_blocks_0/attentions_0/transformer_blocks_0/attn2"].shape == (2, 16, 24)
    assert maps["up_blocks_1/attentions_2/transformer_blocks_0/attn2"].shape == (2, 8, 12)
    assert maps["mid_block/attentions_0/transformer_blocks_0/attn2"].shape == (2, 4, 6)
    assert len(maps) == len(U.attention_layer_names(ours[0].config)) // 2


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------
def test_bad_boxes_and_inputs():
    with pytest.raises(ValueError, match="overlap"):
        S.saa_inputs(2, (512, 512), [[0, 0, 0.6, 0.6], [0.5, 0.5, 1, 1]])
    with pytest.raises(ValueError, match="3 boxes for 2 identities"):
        S.saa_inputs(2, (512, 512), [[0, 0, .3, .3], [0, .4, .3, .6], [0, .7, .3, 1]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        S.saa_inputs(1, (512, 512), [[0, 0, 1.2, 1]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        S.saa_inputs(1, (512, 512), [[-0.1, 0, 0.5, 1]])
    with pytest.raises(ValueError, match="inverted"):
        S.saa_inputs(1, (512, 512), [[0.6, 0, 0.5, 1]])
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        S.saa_inputs(1, (512, 512), [[0, 0, 1]])
    with pytest.raises(ValueError, match="relative widths|positive numbers"):
        S.layout_boxes(3, [1, 2])
    with pytest.raises(ValueError, match="layout"):
        S.layout_boxes(3, "diagonal")
    with pytest.raises(ValueError, match="multiples of 8"):
        S.saa_inputs(1, (500, 512))
    with pytest.raises(ValueError, match="mix"):
        S.saa_inputs(2, (512, 512), [[0, 0, 1, 1]], mix=1.5)
    S.saa_inputs(2, (512, 512), [[0, 0, 0.5, 0.5], [0, 0.5, 0.5, 1]])  # touching edges are fine


def test_bad_strategy_inputs():
    layer, params, hidden, context, inputs = _layer_setup(S.SAA(lora_rank=2))
    with pytest.raises(TypeError, match="SAAInputs"):
        layer.apply({"params": params}, hidden, context, None)
    with pytest.raises(ValueError, match="do not form a grid"):  # 16 queries cannot be a 1:2 image's grid
        layer.apply({"params": params}, hidden, context, S.saa_inputs(2, (32, 64), LAYER_BOXES))
    with pytest.raises(ValueError, match="ID tokens"):
        layer.apply({"params": params}, hidden, context[:, :8], inputs)
