"""IMR (docs/method.md §5): KeyPointEncoder (real size, eval + train mode) and the IMR end to end vs the torch
oracle."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from flax import traverse_util

from dynamicid_jax.methods import imr
from dynamicid_jax.weights import keymap as km
from dynamicid_jax.methods import dynamicid_official as official

TINY = imr.imr_config("tiny")


def landmark_rasters(n: int, seed: int) -> np.ndarray:
    """Rasters as the official code makes them: 106 single pixels set on a 96×96 image, then (x − 0.5)/0.5."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 96, 96, 1), np.float32)
    for i in range(n):
        centre = rng.uniform(30, 66, size=2)
        pts = np.clip(centre + rng.normal(0, 14, size=(106, 2)), 1, 95).astype(int)
        out[i, pts[:, 1], pts[:, 0], 0] = 1.0
    return (out - 0.5) / 0.5


def to_nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------------------------------------------------
# KeyPointEncoder, real size
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def torch_kpe(torch):
    import torch_reference as tr

    model = tr.randomize_(tr.KeyPointEncoder(), seed=2)
    tr.calibrate_batchnorm_(model, [to_nchw(landmark_rasters(4, seed=s)) for s in (10, 11)])
    # calibrated statistics, then nudged so that they are not exactly the statistics of any batch
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(0.05 * torch.randn(m.running_mean.shape))
                m.running_var.mul_(1.0 + 0.1 * torch.rand(m.running_var.shape))
    return model.eval()


@pytest.fixture(scope="session")
def kpe(torch_kpe):
    import torch_reference as tr

    config, variables = official.import_keypoint_encoder(tr.state_dict_numpy(torch_kpe))
    module = imr.KeyPointEncoder(config)
    eval_fn = jax.jit(lambda v, x: module.apply(v, x, train=False))
    train_fn = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))
    return module, variables, eval_fn, train_fn


def test_keypoint_encoder_eval_matches_torch(torch, torch_kpe, kpe):
    _, variables, eval_fn, _ = kpe
    x = landmark_rasters(3, seed=0)
    ours = eval_fn(variables, jnp.asarray(x))
    with torch.no_grad():
        ref = torch_kpe.eval()(to_nchw(x))
    assert ref.shape == (3, 768, 1, 1)  # the official map is 1×1: callers reshape it, nothing is pooled
    assert ours.shape == (3, 768)
    assert float(jnp.min(ours)) >= 0.0  # ends in ReLU
    assert float(jnp.mean(ours > 0)) > 0.2  # not a dead output
    assert_close(ours, ref.reshape(3, 768).numpy(), atol=1e-4, rtol=1e-4, what="KeyPointEncoder eval")


def test_keypoint_encoder_train_mode_matches_torch(torch, torch_kpe, kpe):
    """Batch statistics for the forward pass and torch's running-statistics update (unbiased variance).

    The oracle runs in float64: at the 1×1 stages BatchNorm sees only B values per channel, which amplifies
    rounding, so torch's own fp32 CPU result is ~1e-2 away from its fp64 one on this input, while ours is
    within 1e-4 of fp64."""
    _, variables, eval_fn, train_fn = kpe
    x = landmark_rasters(6, seed=1)
    ours, updated = train_fn(variables, jnp.asarray(x))
    model = copy.deepcopy(torch_kpe).double().train()
    with torch.no_grad():
        ref = model(to_nchw(x).double()).reshape(6, 768).numpy()
    assert_close(ours, ref, atol=1e-4, rtol=1e-4, what="KeyPointEncoder train-mode output")
    assert not np.allclose(ours, eval_fn(variables, jnp.asarray(x)), atol=1e-3)  # batch stats ≠ running stats
    ref_stats = {k: v.numpy() for k, v in model.state_dict().items() if "running" in k}
    new_flat = traverse_util.flatten_dict(updated["batch_stats"])
    old_flat = traverse_util.flatten_dict(variables["batch_stats"])
    assert len(new_flat) == len(ref_stats) == 2 * 18  # 18 Conv-BN units
    for path, value in new_flat.items():
        key = imr.KEYPOINT_ENCODER_KEYMAP.torch_key(path)
        assert_close(value, ref_stats[key], atol=1e-4, rtol=1e-4, what=f"updated {key}")
        assert not np.allclose(value, old_flat[path])  # the statistics really moved


def test_keypoint_encoder_rejects_other_inputs(kpe):
    module, variables, _, _ = kpe
    for bad in [(2, 64, 64, 1), (2, 96, 96), (2, 1, 96, 96), (2, 96, 96, 3)]:
        with pytest.raises(ValueError, match=r"raster must be \[B, 96, 96, 1\]"):
            jax.eval_shape(lambda x: module.apply(variables, x), jax.ShapeDtypeStruct(bad, jnp.float32))
    with pytest.raises(ValueError, match="more than one value per channel"):
        jax.eval_shape(lambda x: module.apply(variables, x, train=True, mutable=["batch_stats"]),
                       jax.ShapeDtypeStruct((1, 96, 96, 1), jnp.float32))


def test_keypoint_encoder_size(torch):
    import torch_reference as tr

    abstract = imr.keypoint_abstract_variables(imr.KeyPointEncoder())
    with torch.device("meta"):
        ref = tr.KeyPointEncoder()
    assert km.count_params(abstract["params"]) == tr.count_parameters(ref) == 8_298_976
    n_stats = sum(v.numel() for k, v in ref.state_dict().items() if "running" in k)
    assert km.count_params(abstract["batch_stats"]) == n_stats


# ---------------------------------------------------------------------------------------------------------
# IMR
# ---------------------------------------------------------------------------------------------------------
def _torch_imr(config: imr.IMRConfig, seed: int):
    import torch_reference as tr

    model = tr.IMR(dim=config.dim, heads=config.heads, head_dim=config.head_dim, num_queries=config.num_queries,
                   embedding_dim=config.embedding_dim, txt_dim=config.txt_dim, ff_mult=config.ff_mult,
                   disentangle_depth=config.disentangle_depth, entangle_depth=config.entangle_depth)
    return tr.randomize_(model, seed=seed).eval()


def _imr_inputs(config: imr.IMRConfig, t: int, seed: int):
    rng = np.random.default_rng(seed)
    e, dt = config.embedding_dim, config.txt_dim
    tokens = rng.standard_normal((1, config.num_queries, e)).astype(np.float32)
    lmk = np.abs(rng.standard_normal((1 + t, e))).astype(np.float32)  # KeyPointEncoder output is ≥ 0
    txt = rng.standard_normal((1 + t, dt)).astype(np.float32)
    return tokens, lmk[:1], txt[:1], lmk[1:], txt[1:]


@pytest.mark.parametrize("depths", [(1, 1), (2, 3)])
def test_imr_matches_torch(torch, depths):
    import torch_reference as tr

    config = imr.imr_config("tiny", disentangle_depth=depths[0], entangle_depth=depths[1])
    model = _torch_imr(config, seed=3)
    got_config, params = official.import_imr(tr.state_dict_numpy(model), config)
    assert got_config == config
    module = imr.IMR(config)
    inputs = _imr_inputs(config, t=3, seed=4)
    ours, state = jax.jit(lambda p, *a: module.apply({"params": p}, *a, mutable=["intermediates"]))(
        params, *map(jnp.asarray, inputs))
    with torch.no_grad():
        tokens, src_l, src_t, tgt_l, tgt_t = [torch.from_numpy(a) for a in inputs]
        ref = model(tokens, src_l, tgt_l, src_t, tgt_t).numpy()  # the official argument order
        ref_psi = model.motion(torch.from_numpy(inputs[3]), torch.from_numpy(inputs[4])).numpy()
    assert ours.shape == (3, config.num_queries, config.embedding_dim)
    assert_close(ours, ref, atol=1e-4, rtol=1e-4, what=f"IMR output, depths {depths}")
    assert_close(state["intermediates"]["motion_tgt"][0], ref_psi, atol=1e-4, rtol=1e-4, what="target motion ψ")
    # different target motions give different edits of the same source
    assert float(jnp.abs(ours[0] - ours[1]).max()) > 1e-3


@pytest.fixture(scope="session")
def tiny_imr():
    module = imr.IMR(TINY)
    params = imr.init_params(module, jax.random.key(0))
    return module, params, jax.jit(lambda p, *a: module.apply({"params": p}, *a))


def test_imr_broadcast_and_vector_sources(tiny_imr):
    module, params, run = tiny_imr
    tokens, src_l, src_t, tgt_l, tgt_t = map(jnp.asarray, _imr_inputs(TINY, t=2, seed=5))
    out = run(params, tokens, src_l, src_t, tgt_l, tgt_t)
    # a target equal to another target gives the same row; 1-D source vectors are accepted
    same = run(params, tokens, src_l[0], src_t[0], jnp.stack([tgt_l[1], tgt_l[1]]), jnp.stack([tgt_t[1], tgt_t[1]]))
    assert_close(same[0], same[1], atol=1e-6, rtol=0, what="identical targets")
    assert_close(same[0], out[1], atol=1e-5, rtol=1e-5, what="row independent of the other targets")


def test_imr_rejects_bad_inputs(tiny_imr):
    module, params, _ = tiny_imr
    tokens, src_l, src_t, tgt_l, tgt_t = map(jnp.asarray, _imr_inputs(TINY, t=2, seed=6))

    def call(*args):
        return jax.eval_shape(lambda *a: module.apply({"params": params}, *a), *args)

    with pytest.raises(ValueError, match=r"id_tokens must be \[1, 4, 32\]"):
        call(jnp.concatenate([tokens, tokens]), src_l, src_t, tgt_l, tgt_t)
    with pytest.raises(ValueError, match="src_landmark_feat"):
        call(tokens, jnp.concatenate([src_l, src_l]), src_t, tgt_l, tgt_t)
    with pytest.raises(ValueError, match=r"tgt_text_feat must be \[T, 32\]"):
        call(tokens, src_l, src_t, tgt_l, tgt_t[:, :31])
    with pytest.raises(ValueError, match="2 target landmark rows but 1 target text rows"):
        call(tokens, src_l, src_t, tgt_l, tgt_t[:1])


def test_full_size_imr_matches_torch_architecture(torch):
    import torch_reference as tr

    config = imr.imr_config("sd15")
    assert (config.disentangle_depth, config.entangle_depth, config.heads, config.head_dim) == (1, 1, 16, 64)
    abstract = imr.abstract_params(imr.IMR(config))
    with torch.device("meta"):
        ref = tr.IMR()
    assert km.count_params(abstract) == tr.count_parameters(ref) == 40_926_464
    ours = {}
    for path, leaf in traverse_util.flatten_dict(km._unbox(abstract)).items():
        ours[imr.IMR_KEYMAP.torch_key(path)] = tuple(leaf.shape)[:: -1 if path[-1] == "kernel" else 1]
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    shapes = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in ref.state_dict().items()}
    assert official.infer_imr_config(shapes) == config


def test_imr_config_variants():
    assert imr.imr_config("sd15") == imr.IMRConfig()
    assert imr.imr_config("sd15", disentangle_depth=4, entangle_depth=4).entangle_depth == 4
    assert imr.IMRConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown IMR variant"):
        imr.imr_config("xl")
    with pytest.raises(ValueError, match="disentangle_depth"):
        imr.imr_config("tiny", disentangle_depth=0)
    assert imr.keypoint_encoder_config("tiny").embedding_dim == 32
