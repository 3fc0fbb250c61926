"""ID encoder (docs/method.md §3): parity with the independent torch re-expression, full-size shapes, input errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from flax import traverse_util

from dynamicid_jax.methods import id_encoder as ide
from dynamicid_jax.weights import keymap as km
from dynamicid_jax.methods import dynamicid_official as official

CFG = ide.id_encoder_config("tiny")


@pytest.fixture(scope="session")
def torch_encoder(torch):
    import torch_reference as tr

    model = tr.ProjPlusModel(id_embed_dim=CFG.id_embed_dim, num_tokens=CFG.num_tokens, dim=CFG.dim,
                             clip_dim=CFG.clip_dim, depth=CFG.depth, heads=CFG.heads, head_dim=CFG.head_dim,
                             ff_mult=CFG.ff_mult)
    return tr.randomize_(model, seed=1).eval()


@pytest.fixture(scope="session")
def imported(torch_encoder):
    import torch_reference as tr

    config, params = official.import_id_encoder(tr.state_dict_numpy(torch_encoder), CFG)
    return ide.IDEncoder(config), params


@pytest.fixture(scope="session")
def encode(imported):
    """Jitted ``(e, clip, shortcut, scale) → (tokens, intermediates)`` (one compile per shortcut mode)."""
    module, params = imported

    @jax.jit
    def run(e, clip, scale):
        return module.apply({"params": params}, e, clip, shortcut=True, scale=scale, mutable=["intermediates"])

    @jax.jit
    def run_plain(e, clip):
        return module.apply({"params": params}, e, clip, mutable=["intermediates"])

    return lambda e, clip, shortcut=False, scale=1.0: (run(e, clip, scale) if shortcut else run_plain(e, clip))


@pytest.fixture(scope="session")
def inputs():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((2, CFG.id_embed_dim)).astype(np.float32)
    e /= np.linalg.norm(e, axis=-1, keepdims=True)  # ArcFace vectors are L2-normalised
    clip = rng.standard_normal((2, 9, CFG.clip_dim)).astype(np.float32)
    return e, clip


@pytest.mark.parametrize("shortcut,scale", [(False, 1.0), (True, 1.0), (True, 0.5)])
def test_matches_torch(torch, torch_encoder, encode, inputs, shortcut, scale):
    e, clip = inputs
    ours, state = encode(jnp.asarray(e), jnp.asarray(clip), shortcut, scale)
    with torch.no_grad():
        ref = torch_encoder(torch.from_numpy(e), torch.from_numpy(clip), shortcut=shortcut, scale=scale).numpy()
        ref_x = torch_encoder.mlp_tokens(torch.from_numpy(e)).numpy()
    assert ours.shape == (2, CFG.num_tokens, CFG.dim)
    assert_close(ours, ref, atol=1e-4, rtol=1e-4, what=f"ID tokens (shortcut={shortcut}, scale={scale})")
    assert_close(state["intermediates"]["mlp_tokens"][0], ref_x, atol=1e-4, rtol=1e-4, what="MLP tokens")
    if shortcut:  # shortcut adds the MLP tokens to the plain output
        plain, _ = encode(jnp.asarray(e), jnp.asarray(clip))
        assert_close(ours, ref_x + scale * np.asarray(plain), atol=1e-4, rtol=1e-4, what="x + scale·resampler")


def test_unconditional_tokens(torch, torch_encoder, imported, inputs):
    module, params = imported
    _, clip = inputs
    ours = jax.jit(lambda c: ide.unconditional_id_tokens(module, params, c))(jnp.asarray(clip[:1]))
    with torch.no_grad():
        ref = torch_encoder(torch.zeros(1, CFG.id_embed_dim), torch.from_numpy(clip[:1])).numpy()
    assert_close(ours, ref, atol=1e-4, rtol=1e-4, what="unconditional ID tokens")
    grey = ide.unconditional_clip_pixels(2)
    assert grey.shape == (2, 224, 224, 3) and float(jnp.abs(grey).max()) == 0.0


def test_batch_rows_are_independent(encode, inputs):
    e, clip = inputs
    both, _ = encode(jnp.asarray(e), jnp.asarray(clip))
    one, _ = encode(jnp.asarray(e[1:]), jnp.asarray(clip[1:]))
    assert_close(both[1:], one, atol=1e-5, rtol=1e-5, what="row 1 alone vs in a batch")
    assert float(jnp.abs(both[0] - both[1]).max()) > 1e-3  # different identities → different tokens


def test_bf16_compute_close_to_fp32(imported, encode, inputs):
    _, params = imported
    e, clip = inputs
    ref, _ = encode(jnp.asarray(e), jnp.asarray(clip))
    low = jax.jit(ide.IDEncoder(CFG, dtype=jnp.bfloat16).apply)({"params": params}, jnp.asarray(e), jnp.asarray(clip))
    assert low.dtype == jnp.bfloat16
    assert_close(np.asarray(low.astype(jnp.float32)), ref, atol=0.15, rtol=0.05, what="bf16 vs fp32")


def test_full_size_matches_torch_architecture(torch):
    """sd15 (and a dlib-sized) encoder: parameter count and every key/shape equal the torch module's."""
    import torch_reference as tr

    for id_dim in (512, 128):
        config = ide.id_encoder_config("sd15", id_embed_dim=id_dim)
        abstract = ide.abstract_params(ide.IDEncoder(config))
        with torch.device("meta"):
            ref = tr.ProjPlusModel(id_embed_dim=id_dim)
        assert km.count_params(abstract) == tr.count_parameters(ref)
        if id_dim == 512:
            assert km.count_params(abstract) == 33_581_568
        ours = {}
        for path, leaf in traverse_util.flatten_dict(km._unbox(abstract)).items():
            shape = tuple(leaf.shape)
            if path[-1] == "kernel":
                shape = shape[::-1]
            ours[ide.ID_ENCODER_KEYMAP.torch_key(path)] = shape
        assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        # and the importer infers exactly this config from those shapes
        shapes = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in ref.state_dict().items()}
        assert official.infer_id_encoder_config(shapes) == config


def test_config_variants_and_errors():
    assert ide.id_encoder_config("sd15") == ide.IDEncoderConfig()
    assert ide.id_encoder_config("sd15", id_embed_dim=128).id_embed_dim == 128
    assert ide.IDEncoderConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="unknown ID encoder variant"):
        ide.id_encoder_config("sd3")
    with pytest.raises(ValueError, match="depth"):
        ide.id_encoder_config("tiny", depth=0)
    with pytest.raises(ValueError, match="unknown entries"):
        ide.IDEncoderConfig.from_dict({**CFG.to_dict(), "bogus": 1})
    assert dataclasses.replace(CFG, heads=4).heads == 4


def test_bad_inputs(imported, inputs):
    module, params = imported
    e, clip = inputs
    with pytest.raises(ValueError, match=r"id_embeds must be \[B, 16\]"):
        module.apply({"params": params}, jnp.zeros((2, 15)), jnp.asarray(clip))
    with pytest.raises(ValueError, match=r"clip_features must be \[B, L, 48\]"):
        module.apply({"params": params}, jnp.asarray(e), jnp.zeros((2, 9, 47)))
    with pytest.raises(ValueError, match="batch mismatch"):
        module.apply({"params": params}, jnp.asarray(e), jnp.asarray(clip[:1]))
    with pytest.raises(ValueError, match="clip_features_of_grey"):
        ide.unconditional_id_tokens(module, params, jnp.zeros((9, CFG.clip_dim)))


def test_random_init_is_usable():
    module = ide.IDEncoder(CFG)
    params = ide.init_params(module, jax.random.key(3))
    out = jax.jit(module.apply)({"params": params}, jnp.ones((1, CFG.id_embed_dim)), jnp.ones((1, 5, CFG.clip_dim)))
    assert out.shape == (1, 4, CFG.dim) and bool(jnp.all(jnp.isfinite(out)))
