"""DynamicID's SAA and Infinite-ID on the tiny SDXL-shaped UNet (transformer depths 1/2/3, text_time embedding):
strategies on every attention layer, gates sown, id_scale=0 equals plain SDXL, and SDXL-width method configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import traverse_util

from dynamicid_jax.methods import id_encoder as ide
from dynamicid_jax.methods import imr
from dynamicid_jax.methods import infinite_id as iid
from dynamicid_jax.methods import saa as S
from dynamicid_jax.pipelines.gates import gate_maps
from dynamicid_jax.models import unet as U

CONFIG = U.unet_config("tiny-sdxl")
TEXT_LEN, N_ID = 5, 4
IMAGE = (64, 64)  # pixels: 8×8 latents


def _random_like(abstract, seed, scale=0.05):
    """Host-side random params of the abstract tree's shapes (a jitted init would compile the whole UNet)."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        noise = (rng.standard_normal(a.shape) * scale).astype(np.float32)
        return noise + 1.0 if getattr(path[-1], "key", None) == "scale" else noise  # norm scales near 1

    return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(abstract))


@pytest.fixture(scope="module")
def base_params():
    return _random_like(U.abstract_params(U.UNet2DConditionModel(CONFIG)), 0)


@pytest.fixture(scope="module")
def plain_eps(base_params):
    """The plain SDXL UNet on the two rows of :func:`_batch` (text tokens only)."""
    x, t, ctx, added = _batch(2)
    plain = U.UNet2DConditionModel(CONFIG)
    return np.asarray(jax.jit(lambda p: plain.apply({"params": p}, x, t, ctx[:, :TEXT_LEN], None, added))(base_params))


def _batch(batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 8, 8, 4)).astype(np.float32)
    t = np.full((batch,), 500, np.int32)
    ctx = rng.standard_normal((batch, TEXT_LEN + N_ID, CONFIG.cross_attention_dim)).astype(np.float32)
    added = {"text_embeds": rng.standard_normal((batch, CONFIG.pooled_text_dim)).astype(np.float32),
             "time_ids": np.asarray(U.micro_conditioning(batch, (8, 8)))}
    return x, t, ctx, added


def _layer_paths(tree, leaf_module):
    return sorted("/".join(p[:p.index(leaf_module)]) for p in traverse_util.flatten_dict(tree)
                  if leaf_module in p and p[-1] == "kernel" and p[p.index(leaf_module) + 1:] in (("kernel",),
                                                                                             ("down", "kernel")))


def _module_path(name: str) -> str:
    """diffusers layer name → our module path (down_blocks.1.attentions.0.… → down_blocks_1/attentions_0/…)."""
    parts = name.split(".")
    out, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            out.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return "/".join(out)


def test_saa_on_every_sdxl_layer_gates_sown_and_id_scale_zero_is_plain(base_params, plain_eps):
    """Fresh SAA on the SDXL-shaped UNet: LoRA in all 56 attention layers, the ID branch in all 28
    cross-attentions (diffusers' processor order), one gate [B, L_q] sown per cross-attention; with id_scale=0
    the output equals the plain SDXL UNet; with id_scale=1 it does not."""
    strategy = S.SAA(lora_rank=4)
    names = U.attention_layer_names(CONFIG)
    fresh = S.init_saa_params(CONFIG, jax.random.key(1), strategy)
    assert _layer_paths(fresh, "to_q_lora") == sorted(_module_path(n) for n in names)
    assert _layer_paths(fresh, "to_k_ip") == sorted(_module_path(n) for n in names if n.endswith("attn2"))
    params = S.merge_params(base_params, fresh)
    saa_unet = U.UNet2DConditionModel(CONFIG, strategy=strategy)
    x, t, ctx, added = _batch(2)

    apply_saa = jax.jit(lambda p, inp: saa_unet.apply({"params": p}, x, t, ctx, inp, added,
                                                      mutable=["intermediates"]))
    off, _ = apply_saa(params, S.saa_inputs(1, IMAGE, id_scale=0.0))
    base = plain_eps
    np.testing.assert_allclose(np.asarray(off), base, atol=1e-6, rtol=0)
    on, state = apply_saa(params, S.saa_inputs(1, IMAGE))
    assert float(jnp.abs(on - base).max()) > 1e-3
    gates = gate_maps(state["intermediates"], IMAGE)
    assert sorted(gates) == sorted(_module_path(n) for n in names if n.endswith("attn2"))
    assert all(g.shape[0] == 2 and 0.0 <= float(g.min()) and float(g.max()) <= 1.0 for g in gates.values())


def _id_params(seed=2):
    return _random_like(iid.abstract_id_params(CONFIG), seed, scale=0.2)


def test_infinite_id_two_stream_on_sdxl(base_params, plain_eps):
    """Infinite-ID on the SDXL-shaped UNet: ID projections in all 28 cross-attentions; in two-stream sampling
    the text rows are the plain SDXL UNet, and the ID rows equal them at id_scale=0 without mixing; mixing with
    AdaIN-mean and id_scale=1 changes the ID rows. The id-only training loss traces on SDXL (the numeric
    gradient check is in make test-slow)."""
    names = U.attention_layer_names(CONFIG)
    id_params = _id_params()
    assert _layer_paths(id_params, "to_k_id") == sorted(_module_path(n) for n in names if n.endswith("attn2"))
    params = iid.merge_id_params(base_params, id_params)
    unet = U.UNet2DConditionModel(CONFIG, strategy=iid.InfiniteIDAttention())
    x, t, ctx, added = (jax.tree_util.tree_map(lambda a: a[:1], v) for v in _batch(2))
    two = lambda a: jnp.concatenate([a, a])  # noqa: E731  [text row; ID row]
    run = jax.jit(lambda p, inp: unet.apply({"params": p}, two(x), two(t), two(ctx), inp,
                                            jax.tree_util.tree_map(two, added)))
    plain = plain_eps[:1]
    off = run(params, iid.two_stream_inputs(N_ID, guided=False, id_scale=0.0, mix=False))
    np.testing.assert_allclose(np.asarray(off[:1]), np.asarray(plain), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(off[1:]), np.asarray(plain), atol=1e-5, rtol=0)
    on = run(params, iid.two_stream_inputs(N_ID, guided=False, id_scale=1.0, mix=True))
    np.testing.assert_allclose(np.asarray(on[:1]), np.asarray(plain), atol=1e-5, rtol=0)
    assert float(jnp.abs(on[1:] - plain).max()) > 1e-3
    loss, grads = jax.eval_shape(*_id_loss(base_params, id_params))
    assert loss.shape == () and jax.tree_util.tree_structure(grads["id_projections"]) == \
        jax.tree_util.tree_structure(id_params)


@pytest.mark.slow
def test_infinite_id_loss_trains_on_sdxl(base_params):
    """The id-only loss on the SDXL UNet (added conditioning of an empty text) has finite value and grads, and
    the grads reach every ID projection."""
    id_params = _id_params()
    fn, args = _id_loss(base_params, id_params)
    loss, grads = jax.jit(fn)(args)
    assert np.isfinite(float(loss))
    flat = traverse_util.flatten_dict(grads["id_projections"])
    assert all(np.isfinite(np.asarray(g)).all() and float(np.abs(g).max()) > 0 for g in flat.values())


def _id_loss(base_params, id_params):
    """``(value_and_grad(loss), trainable)`` of Infinite-ID's id-only loss on the tiny SDXL UNet."""
    from dynamicid_jax.schedulers import load_scheduler
    from dynamicid_jax.schedulers import SD15_SCHEDULER_CONFIG

    enc_cfg = iid.infinite_id_encoder_config("tiny-sdxl", num_clip_tokens=2, num_face_tokens=2)
    assert enc_cfg.num_tokens == N_ID and enc_cfg.dim == CONFIG.cross_attention_dim
    encoder = iid.InfiniteIDEncoder(enc_cfg)
    trainable = {"encoder": _random_like(iid.abstract_encoder_params(enc_cfg), 4), "id_projections": id_params}
    unet = U.UNet2DConditionModel(CONFIG, strategy=iid.InfiniteIDAttention())
    frozen = {"unet": base_params, "null_clip_features": jnp.zeros((1, 3, enc_cfg.clip_dim))}
    batch = {"id_embeds": jnp.ones((2, enc_cfg.id_embed_dim)), "clip_features": jnp.ones((2, 3, enc_cfg.clip_dim)),
             "latents": jnp.asarray(np.random.default_rng(5).standard_normal((2, 8, 8, 4)), jnp.float32)}
    loss_fn = lambda tr: iid.infinite_id_loss(tr, frozen, batch, jax.random.key(6), unet=unet,  # noqa: E731
                                              encoder=encoder, scheduler=load_scheduler(SD15_SCHEDULER_CONFIG))[0]
    return jax.value_and_grad(loss_fn), trainable


def test_sdxl_method_configs_follow_the_text_width():
    """SDXL variants: ID tokens 2048 wide (ID encoder, Infinite-ID encoder, IMR tokens and landmark features),
    IMR's text feature the 1280-wide pooled embedding; shapes by eval_shape."""
    sdxl = U.unet_config("sdxl")
    enc = ide.IDEncoder(ide.id_encoder_config("sdxl"))
    out = jax.eval_shape(lambda p, e, c: enc.apply({"params": p}, e, c), ide.abstract_params(enc),
                         jnp.zeros((1, 512)), jnp.zeros((1, 257, 1280)))
    assert out.shape == (1, 4, sdxl.cross_attention_dim) == (1, 4, 2048)
    assert iid.infinite_id_encoder_config("sdxl").dim == 2048
    cfg = imr.imr_config("sdxl")
    assert (cfg.embedding_dim, cfg.txt_dim) == (2048, sdxl.pooled_text_dim) == (2048, 1280)
    assert imr.keypoint_encoder_config("sdxl").embedding_dim == 2048
    tiny = ide.id_encoder_config("tiny-sdxl")
    assert tiny.dim == CONFIG.cross_attention_dim and imr.imr_config("tiny-sdxl").txt_dim == CONFIG.pooled_text_dim
