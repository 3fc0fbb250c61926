"""Infinite-ID: mixed attention and AdaIN-mean against NumPy, "ID only" cross-attention, the two-stream UNet against
the base model, the encoder, the training loss and the weight files."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import assert_close
from dynamicid_jax.methods import infinite_id as iid
from dynamicid_jax.methods.infinite_id_weights import load_infinite_id, save_infinite_id
from dynamicid_jax.models import unet as U
from dynamicid_jax.models.layers import Attention, LayerInfo
from dynamicid_jax.schedulers import DDIMScheduler
from dynamicid_jax.weights.keymap import WeightLoadError

HEADS, HEAD_DIM, C = 2, 4, 8


# ---------------------------------------------------------------------------------------------------- NumPy oracle
def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _np_attend(q, k, v):
    """q [Lq, H·D], k/v [Lk, H·D] → [Lq, H·D], heads split as [H, D] (float64)."""
    qh, kh, vh = (x.reshape(x.shape[0], HEADS, HEAD_DIM).transpose(1, 0, 2) for x in (q, k, v))
    w = _softmax(qh @ kh.transpose(0, 2, 1) / np.sqrt(HEAD_DIM))
    return (w @ vh).transpose(1, 0, 2).reshape(q.shape[0], -1)


def _np_adain(x, ref):
    return x - x.mean(0, keepdims=True) + ref.mean(0, keepdims=True)


def _kernel(p, name):
    return np.asarray(p[name]["kernel"], np.float64)


def _init(attn, *args):
    return nn.meta.unbox(jax.jit(attn.init)(jax.random.key(0), *args)["params"])


def _attention(kind):
    info = LayerInfo(f"down_blocks.0.attentions.0.transformer_blocks.0.attn{1 if kind == 'self' else 2}", kind,
                     0 if kind == "self" else 1)
    return Attention(heads=HEADS, head_dim=HEAD_DIM, info=info, strategy=iid.InfiniteIDAttention())


# ---------------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("adain", [False, True])
def test_mixed_self_attention_equals_numpy_formula(adain):
    rng = np.random.default_rng(0)
    groups, b, length = 2, 2, 5  # CFG layout: [uncond text ×2, uncond ID ×2, cond text ×2, cond ID ×2]
    hidden = rng.standard_normal((groups * 2 * b, length, C)).astype(np.float32)
    attn = _attention("self")
    inputs = iid.two_stream_inputs(3, guided=True, adain=adain)
    params = _init(attn, hidden, None, inputs)
    out = np.asarray(jax.jit(attn.apply)({"params": params}, hidden, None, inputs))
    off = np.asarray(jax.jit(attn.apply)({"params": params}, hidden, None, inputs.replace(mix=jnp.asarray(False))))

    h64 = hidden.astype(np.float64)
    wq, wk, wv, wo = (_kernel(params, n) for n in ("to_q", "to_k", "to_v", "to_out_0"))
    bo = np.asarray(params["to_out_0"]["bias"], np.float64)
    for g in range(groups):
        for j in range(b):
            t_row, i_row = g * 2 * b + j, g * 2 * b + b + j
            q_t, k_t, v_t = h64[t_row] @ wq, h64[t_row] @ wk, h64[t_row] @ wv
            q_i, k_i, v_i = h64[i_row] @ wq, h64[i_row] @ wk, h64[i_row] @ wv
            if adain:
                k_i, v_i = _np_adain(k_i, k_t), _np_adain(v_i, v_t)
            mixed = _np_attend(q_i, np.concatenate([k_i, k_t]), np.concatenate([v_i, v_t])) @ wo + bo
            text = _np_attend(q_t, k_t, v_t) @ wo + bo
            plain_id = _np_attend(q_i, h64[i_row] @ wk, h64[i_row] @ wv) @ wo + bo
            assert_close(out[i_row], mixed, atol=1e-5, rtol=1e-5, what=f"mixed attention row {i_row}")
            assert_close(out[t_row], text, atol=1e-5, rtol=1e-5, what=f"text-stream row {t_row}")
            assert_close(off[i_row], plain_id, atol=1e-5, rtol=1e-5, what=f"mixing off, row {i_row}")
            np.testing.assert_array_equal(off[t_row], out[t_row])
    assert np.abs(out - off).max() > 1e-3  # mixing changes the ID rows


def test_adain_mean_shifts_means_and_keeps_centred_part():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 7, 2, 4)) * 2 + 1.5).astype(np.float32)
    ref = (rng.standard_normal((3, 5, 2, 4)) - 4).astype(np.float32)  # other token count: only means matter
    y = np.asarray(iid.adain_mean(jnp.asarray(x), jnp.asarray(ref)), np.float64)
    assert_close(y.mean(1), ref.astype(np.float64).mean(1), atol=1e-5, rtol=0, what="shifted means")
    assert_close(y - y.mean(1, keepdims=True), x - x.astype(np.float64).mean(1, keepdims=True), atol=1e-5, rtol=0,
                 what="centred part")
    assert not np.allclose(y.std(1), ref.std(1), atol=0.1)  # the spread is x's, not the reference's
    assert_close(y.std(1), x.std(1), atol=1e-5, rtol=1e-5, what="spread kept")


def test_id_only_cross_attention_ignores_text():
    rng = np.random.default_rng(2)
    hidden = rng.standard_normal((2, 6, C)).astype(np.float32)
    ids = rng.standard_normal((2, 3, 16)).astype(np.float32)
    text_a, text_b = (rng.standard_normal((2, 5, 16)).astype(np.float32) for _ in range(2))
    attn = _attention("cross")
    inputs = iid.id_only_inputs(3)
    params = _init(attn, hidden, np.concatenate([text_a, ids], 1), inputs)
    # the text branch is not computed: its projections are not even created
    assert set(params) == {"to_q", "to_out_0", "to_k_id", "to_v_id"}
    params = dict(params, to_k={"kernel": jnp.ones((16, C))}, to_v={"kernel": jnp.ones((16, C))})
    run = jax.jit(lambda p, ctx: attn.apply({"params": p}, hidden, ctx, inputs))
    out_a = np.asarray(run(params, np.concatenate([text_a, ids], 1)))
    np.testing.assert_array_equal(out_a, np.asarray(run(params, np.concatenate([text_b, ids], 1))))
    np.testing.assert_array_equal(out_a, np.asarray(run(params, ids)))  # no text at all
    # the formula: to_out(attn(q, ids·W_k_id, ids·W_v_id)); the text projections get no gradient
    wq, wk, wv, wo = (_kernel(params, n) for n in ("to_q", "to_k_id", "to_v_id", "to_out_0"))
    bo = np.asarray(params["to_out_0"]["bias"], np.float64)
    for r in range(2):
        ref = _np_attend(hidden[r].astype(np.float64) @ wq, ids[r] @ wk, ids[r] @ wv) @ wo + bo
        assert_close(out_a[r], ref, atol=1e-5, rtol=1e-5, what="ID-only cross-attention")
    grads = jax.grad(lambda p: jnp.sum(run(p, np.concatenate([text_a, ids], 1)) ** 2))(params)
    assert np.all(np.asarray(grads["to_k"]["kernel"]) == 0) and np.all(np.asarray(grads["to_v"]["kernel"]) == 0)
    assert np.abs(np.asarray(grads["to_k_id"]["kernel"])).max() > 0


def test_two_stream_cross_attention_is_text_plus_lambda_id():
    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((2, 6, C)).astype(np.float32)  # [text row; ID row], no CFG
    ctx = rng.standard_normal((2, 7, 16)).astype(np.float32)  # 5 text + 2 ID tokens
    ctx[1, :5] = ctx[0, :5]  # both streams see the same prompt
    attn = _attention("cross")
    inputs = iid.two_stream_inputs(2, guided=False, id_scale=0.7)
    params = _init(attn, hidden, ctx, inputs)
    out = np.asarray(jax.jit(attn.apply)({"params": params}, hidden, ctx, inputs))
    wq, wk, wv, wki, wvi, wo = (_kernel(params, n) for n in ("to_q", "to_k", "to_v", "to_k_id", "to_v_id",
                                                              "to_out_0"))
    bo = np.asarray(params["to_out_0"]["bias"], np.float64)
    h, c = hidden.astype(np.float64), ctx.astype(np.float64)
    text_only = _np_attend(h[0] @ wq, c[0, :5] @ wk, c[0, :5] @ wv) @ wo + bo
    assert_close(out[0], text_only, atol=1e-5, rtol=1e-5, what="text stream ignores its ID slots")
    both = (_np_attend(h[1] @ wq, c[1, :5] @ wk, c[1, :5] @ wv)
            + 0.7 * _np_attend(h[1] @ wq, c[1, 5:] @ wki, c[1, 5:] @ wvi)) @ wo + bo
    assert_close(out[1], both, atol=1e-5, rtol=1e-5, what="ID stream text + λ·ID")


def test_inputs_errors_and_steps():
    inputs = iid.two_stream_inputs(4, guided=True)
    assert inputs.num_groups == 2 and inputs.adain and bool(inputs.mix)
    flags = [bool(iid.inputs_for_step(inputs, s, 2, 5).mix) for s in range(7)]
    assert flags == [False, False, True, True, True, False, False]
    traced = jax.jit(lambda s: iid.inputs_for_step(inputs, s, 1).mix)
    assert [bool(traced(s)) for s in range(3)] == [False, True, True]
    with pytest.raises(ValueError, match="num_id_tokens"):
        iid.two_stream_inputs(0, guided=False)
    attn = _attention("self")
    hidden = np.zeros((3, 4, C), np.float32)  # 3 rows cannot be [text; ID] pairs
    with pytest.raises(ValueError, match="cannot be 1 group"):
        attn.init(jax.random.key(0), hidden, None, iid.two_stream_inputs(1, guided=False))
    with pytest.raises(TypeError, match="InfiniteIDInputs"):
        attn.init(jax.random.key(0), hidden, None, {"scale": 1.0})


def test_self_attention_layer_selection():
    cfg = U.unet_config("sd15")
    every = iid.self_attention_layers(cfg)
    assert len(every) == 16 and all(i % 2 == 0 for i in every)
    up = iid.self_attention_layers(cfg, ("up_blocks",))
    names = U.attention_layer_names(cfg)
    assert len(up) == 9 and all(names[i].startswith("up_blocks") and names[i].endswith("attn1") for i in up)
    assert iid.self_attention_layers(cfg, "mid_block") == (30,)
    with pytest.raises(ValueError, match="match no self-attention"):
        iid.self_attention_layers(cfg, ("upblocks",))


# ---------------------------------------------------------------------------------------------------- UNet level
# smaller than unet_config("tiny") (4 transformer blocks instead of 7): every code path, a fraction of the compile
MICRO = U.UNetConfig(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                     cross_attention_dim=32, attention_head_dim=2).validate()


def _random_like(abstract, seed):
    """Random params from shapes alone (no init to compile): fan-in-scaled kernels, small biases, unit scales."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":
            return jnp.ones(leaf.shape, jnp.float32)
        std = 0.05 if name != "kernel" else 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape) * std, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract))


@pytest.fixture(scope="session")
def tiny_unet():
    cfg = MICRO
    base = _random_like(U.abstract_params(U.UNet2DConditionModel(cfg)), 0)
    ids = _random_like(iid.abstract_id_params(cfg), 1)
    return cfg, base, ids


def test_two_stream_unet_against_base_model(tiny_unet):
    cfg, base, id_params = tiny_unet
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)  # [uncond, cond] latents of one image
    text = rng.standard_normal((2, 6, 32)).astype(np.float32)  # [negative, prompt]
    ids = rng.standard_normal((2, 3, 32)).astype(np.float32)
    # rows [u_text, u_ID, c_text, c_ID]: each stream pair shares latents and prompt
    rows = np.array([0, 0, 1, 1])
    sample, t = x[rows], np.int32(500)
    ctx = np.concatenate([text[rows], np.stack([np.zeros_like(ids[0]), ids[0], np.zeros_like(ids[1]), ids[1]])], 1)

    base_unet = U.UNet2DConditionModel(cfg)
    ref = np.asarray(jax.jit(base_unet.apply)({"params": base}, x, t, text))
    two = U.UNet2DConditionModel(cfg, strategy=iid.InfiniteIDAttention())
    merged = iid.merge_id_params(base, id_params)
    run = jax.jit(lambda p, lam, mix: two.apply({"params": p}, sample, t, ctx,
                                                iid.two_stream_inputs(3, guided=True, id_scale=lam, mix=mix)))
    off = np.asarray(run(merged, 0.0, False))
    assert_close(off, ref[rows], atol=2e-5, rtol=2e-5, what="mixing off + λ=0 = base model (all rows)")
    on = np.asarray(run(merged, 1.0, True))
    assert_close(on[[0, 2]], ref, atol=2e-5, rtol=2e-5, what="text stream = base model with mixing on")
    assert np.abs(on[[1, 3]] - ref).max() > 1e-2  # the ID stream does change


def test_training_loss_and_trainable_split(tiny_unet):
    cfg, base, id_params = tiny_unet
    enc_cfg = iid.infinite_id_encoder_config("tiny")
    encoder = iid.InfiniteIDEncoder(enc_cfg)
    enc_params = iid.init_encoder_params(enc_cfg, jax.random.key(2))
    id_params = iid.init_id_from_base(base, id_params)
    flat_ids = traverse_util.flatten_dict(id_params)
    flat_base = traverse_util.flatten_dict(base)
    assert len(flat_ids) == 2 * len(U.attention_layer_names(cfg)) // 2
    for path, value in flat_ids.items():
        np.testing.assert_array_equal(value, flat_base[path[:-2] + (path[-2][:-3], "kernel")])
    trainable, frozen = iid.split_trainable(iid.merge_id_params(base, id_params), enc_params)
    assert traverse_util.flatten_dict(frozen["unet"]).keys() == flat_base.keys()
    rng = np.random.default_rng(5)
    frozen["null_clip_features"] = rng.standard_normal((1, 9, 64)).astype(np.float32)
    batch = {"latent_mean": rng.standard_normal((2, 4, 4, 4)).astype(np.float32),
             "latent_logvar": np.full((2, 4, 4, 4), -2.0, np.float32),
             "id_embeds": rng.standard_normal((2, 16)).astype(np.float32),
             "clip_features": rng.standard_normal((2, 9, 64)).astype(np.float32)}
    unet = U.UNet2DConditionModel(cfg, strategy=iid.InfiniteIDAttention())
    grad_fn = jax.jit(jax.value_and_grad(lambda tr, fr, bt, r: iid.infinite_id_loss(
        tr, fr, bt, r, unet=unet, encoder=encoder, scheduler=DDIMScheduler(), id_dropout=0.0)[0]))

    def loss_fn(tr, r):  # params are arguments, not closure constants (those would be folded into the program)
        return grad_fn(tr, frozen, batch, r)

    loss, grads = loss_fn(trainable, jax.random.key(3))
    assert np.isfinite(float(loss)) and 0.1 < float(loss) < 100
    g_enc = traverse_util.flatten_dict(grads["encoder"])
    g_ids = traverse_util.flatten_dict(grads["id_projections"])
    assert max(float(jnp.abs(g).max()) for g in g_ids.values()) > 0
    assert all(float(jnp.abs(g).max()) > 0 for k, g in g_enc.items() if k[0] == "face_mapper")
    # deterministic per key, different for another key
    assert float(loss_fn(trainable, jax.random.key(3))[0]) == float(loss)
    assert float(loss_fn(trainable, jax.random.key(4))[0]) != float(loss)
    with pytest.raises(KeyError, match="latents"):
        iid.infinite_id_loss(trainable, frozen, {"id_embeds": batch["id_embeds"]}, jax.random.key(0), unet=unet,
                             encoder=encoder, scheduler=DDIMScheduler())


# ---------------------------------------------------------------------------------------------------- encoder
def test_encoder_tokens_stacking_and_sizes():
    cfg = iid.infinite_id_encoder_config("tiny")
    encoder = iid.InfiniteIDEncoder(cfg)
    params = iid.init_encoder_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(6)
    e, clip = rng.standard_normal((3, 16)).astype(np.float32), rng.standard_normal((3, 9, 64)).astype(np.float32)
    apply = jax.jit(encoder.apply)
    tokens = np.asarray(apply({"params": params}, e, clip))
    assert tokens.shape == (3, cfg.num_tokens, 32) and cfg.num_tokens == 6
    # CLIP tokens come first and depend only on the CLIP features; face tokens only on the ArcFace vector
    other = np.asarray(apply({"params": params}, e[::-1].copy(), clip))
    np.testing.assert_allclose(other[:, :4], tokens[:, :4], atol=1e-6)
    assert np.abs(other[:, 4:] - tokens[:, 4:]).max() > 1e-3
    stacked = np.asarray(iid.stack_identities(jnp.asarray(tokens)))
    assert stacked.shape == (1, 18, 32)
    np.testing.assert_array_equal(stacked[0, 6:12], tokens[1])
    with pytest.raises(ValueError, match=r"id_embeds must be \[B, 16\]"):
        encoder.apply({"params": params}, e[:, :8], clip)
    with pytest.raises(ValueError, match="clip_features must be"):
        encoder.apply({"params": params}, e, clip[..., :8])
    with pytest.raises(ValueError, match="positive integer"):
        iid.infinite_id_encoder_config("tiny", num_clip_tokens=0)
    full = iid.infinite_id_encoder_config("sd15")
    assert full.num_tokens == 20 and full.clip_layer == -2
    shapes = traverse_util.flatten_dict(nn.meta.unbox(iid.abstract_encoder_params(full)))
    assert shapes[("clip_mapper", "latents")].shape == (16, 768)
    assert shapes[("face_mapper", "proj_2", "kernel")].shape == (1024, 4 * 768)


@pytest.mark.slow
def test_sd15_id_projections_eval_shape():
    ids = traverse_util.flatten_dict(nn.meta.unbox(iid.abstract_id_params(U.unet_config("sd15"))))
    assert len(ids) == 32 and all(v.shape[0] == 768 and v.shape[1] in (320, 640, 1280) for v in ids.values())


def test_weights_round_trip(tiny_unet, tmp_path):
    cfg, _, id_params = tiny_unet
    enc_cfg = iid.infinite_id_encoder_config("tiny")
    enc_params = iid.init_encoder_params(enc_cfg, jax.random.key(0))
    save_infinite_id(str(tmp_path), enc_cfg, enc_params, id_params, cfg)
    cfg2, enc2, ids2 = load_infinite_id(str(tmp_path), cfg)
    assert cfg2 == enc_cfg
    for a, b in ((enc_params, enc2), (id_params, ids2)):
        fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
        assert fa.keys() == fb.keys()
        for k in fa:
            np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]))
    wider = dataclasses.replace(cfg, cross_attention_dim=48)
    with pytest.raises(WeightLoadError, match="cross-attention width"):
        load_infinite_id(str(tmp_path), wider)
    with pytest.raises(FileNotFoundError, match="no Infinite-ID weights"):
        load_infinite_id(str(tmp_path / "nothing"), cfg)
    with pytest.raises(WeightLoadError, match="does not match"):
        save_infinite_id(str(tmp_path / "bad"), enc_cfg, enc_params, {}, cfg)
