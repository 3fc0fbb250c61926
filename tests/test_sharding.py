"""Mesh, rules table and sharding helpers on the 8 virtual CPU devices (see conftest.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import assert_close
from dynamicid_jax import sharding as sh
from dynamicid_jax.models import layers


class TinyNet(nn.Module):
    """conv → GroupNorm → (tokens) Dense MLP with residual → LayerNorm → conv, plus a class embedding."""

    @nn.compact
    def __call__(self, x, labels):
        h = layers.conv(16, 3, name="conv_in", padding=1)(x)
        h = h + layers.embed(10, 16, name="class_embedding")(labels)[:, None, None, :]
        h = nn.silu(layers.group_norm(4, 1e-5, name="norm_in")(h))
        h = nn.with_logical_constraint(h, (layers.ACT_BATCH, None, None, "activation_embed"))
        b, hh, ww, c = h.shape
        t = h.reshape(b, hh * ww, c)
        u = layers.gelu(layers.dense(32, name="ff_in")(t))
        u = nn.with_logical_constraint(u, (layers.ACT_BATCH, "activation_length", "activation_mlp"))
        t = t + layers.dense(16, name="ff_out", axes=("mlp", "embed"))(u)
        t = layers.layer_norm(1e-5, name="norm_tok")(t)
        return layers.conv(4, 3, name="conv_out", padding=1)(t.reshape(b, hh, ww, c))


# The PartitionSpec every param must get from LOGICAL_AXIS_RULES.
EXPECTED_SPECS = {
    "params/conv_in/kernel": P(None, None, None, "fsdp"),
    "params/conv_in/bias": P("fsdp"),
    "params/class_embedding/embedding": P(None, "fsdp"),
    "params/norm_in/scale": P(None),
    "params/norm_in/bias": P(None),
    "params/ff_in/kernel": P("fsdp", "tensor"),
    "params/ff_in/bias": P("tensor"),
    "params/ff_out/kernel": P("tensor", "fsdp"),
    "params/ff_out/bias": P("fsdp"),
    "params/norm_tok/scale": P(None),
    "params/norm_tok/bias": P(None),
    "params/conv_out/kernel": P(None, None, None, "fsdp"),
    "params/conv_out/bias": P("fsdp"),
}


def _flat(tree):
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="session")
def mesh222():
    return sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="session")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 10, size=(8,)).astype(np.int32)
    target = rng.standard_normal((8, 4, 4, 4)).astype(np.float32)
    return x, labels, target


@pytest.fixture(scope="session")
def reference_variables(inputs):
    x, labels, _ = inputs
    return nn.meta.unbox(jax.jit(TinyNet().init)(jax.random.key(0), x, labels))  # single device


@pytest.fixture(scope="session")
def sharded(mesh222, inputs):
    x, labels, _ = inputs
    abstract, shardings = sh.param_shardings(TinyNet(), x, labels, mesh=mesh222)
    variables = sh.init_sharded(TinyNet(), jax.random.key(0), x, labels, mesh=mesh222)
    return abstract, shardings, variables


# (1) mesh shapes ------------------------------------------------------------------------------------------
def test_make_mesh_shapes():
    assert len(jax.devices()) == 8
    mesh = sh.make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
        assert all(t == axis_type.Auto for t in mesh.axis_types)
    assert dict(sh.make_mesh(sh.MeshConfig(fsdp=2, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sh.make_mesh({"data": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    sub = sh.make_mesh(sh.MeshConfig(), devices=jax.devices()[:2])
    assert dict(sub.shape) == {"data": 2, "fsdp": 1, "tensor": 1} and sub.devices.size == 2
    one = sh.make_mesh(devices=jax.devices()[:1])
    assert dict(one.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_make_mesh_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"data=3, fsdp=1, tensor=1.*8 available device.*Devices: \["):
        sh.make_mesh(sh.MeshConfig(data=3))
    with pytest.raises(ValueError, match="data=-1, fsdp=3"):
        sh.make_mesh(sh.MeshConfig(fsdp=3))
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sh.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="MeshConfig.tensor must be a positive int or -1"):
        sh.MeshConfig(tensor=0)
    with pytest.raises(ValueError, match="unknown axes.*'model'"):
        sh.make_mesh({"model": 2})


# (2) every param follows the rules table -----------------------------------------------------------------
def test_param_shardings_follow_rules(mesh222, sharded):
    abstract, shardings, variables = sharded
    specs = {k: s.spec for k, s in _flat(shardings).items()}
    assert specs == EXPECTED_SPECS
    for path, leaf in _flat(abstract).items():
        assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding.spec == EXPECTED_SPECS[path], path
    # the params are really distributed: each device holds 1/(split factor) of a sharded kernel
    for path, arr in _flat(variables).items():
        assert arr.sharding.spec == EXPECTED_SPECS[path], path
        split = np.prod([mesh222.shape[a] for a in EXPECTED_SPECS[path] if a is not None])
        assert arr.addressable_shards[0].data.size * split == arr.size, path
    assert _flat(variables)["params/ff_in/kernel"].addressable_shards[0].data.shape == (8, 16)


def test_init_sharded_equals_plain_init(sharded, reference_variables):
    _, _, variables = sharded
    ref = _flat(reference_variables)
    got = _flat(variables)
    assert got.keys() == ref.keys()
    for k in ref:
        assert_close(got[k], ref[k], atol=1e-7, rtol=1e-6, what=k)  # eager vs jit: ≤1 ulp


def test_custom_rules_and_unknown_mesh_axis(mesh222, inputs):
    x, labels, _ = inputs
    rules = tuple(r for r in sh.LOGICAL_AXIS_RULES if r[0] != "conv_out") + (("conv_out", "tensor"),)
    _, shardings = sh.param_shardings(TinyNet(), x, labels, mesh=mesh222, rules=rules)
    assert _flat(shardings)["params/conv_in/kernel"].spec == P(None, None, None, "tensor")
    assert _flat(shardings)["params/ff_in/kernel"].spec == P("fsdp", "tensor")
    with pytest.raises(ValueError, match=r"mesh axes \['model'\].*mesh axes: \['data', 'fsdp', 'tensor'\]"):
        sh.param_shardings(TinyNet(), x, labels, mesh=mesh222, rules=(("embed", "model"),))


def test_shard_params_from_numpy(sharded, reference_variables):
    _, shardings, _ = sharded
    host = jax.tree_util.tree_map(np.asarray, reference_variables)  # as loaded from safetensors: no boxes
    placed = sh.shard_params(host, shardings)
    for k, arr in _flat(placed).items():
        assert arr.sharding == _flat(shardings)[k], k
        assert_close(arr, _flat(host)[k], atol=0, rtol=0, what=k)
    with pytest.raises(ValueError, match=r"missing \['params/conv_in/bias'\]"):
        broken = {"params": dict(host["params"])}
        broken["params"]["conv_in"] = {"kernel": host["params"]["conv_in"]["kernel"]}
        sh.shard_params(broken, shardings)


# (3) sharded forward == unsharded forward -----------------------------------------------------------------
def test_sharded_forward_matches(mesh222, sharded, reference_variables, inputs):
    x, labels, _ = inputs
    _, shardings, variables = sharded
    ref = jax.jit(TinyNet().apply)(reference_variables, x, labels)
    fwd = sh.sharded_jit(TinyNet().apply, in_shardings=(shardings, sh.batch_sharding(mesh222, 4),
                                                        sh.batch_sharding(mesh222, 1)),
                         out_shardings=sh.batch_sharding(mesh222, 4), mesh=mesh222)
    xs, ls = sh.shard_batch((x, labels), mesh222)
    out = fwd(variables, xs, ls)
    assert out.sharding.spec == P(("data", "fsdp"), None, None, None)
    assert_close(out, ref, atol=1e-5, rtol=0, what="sharded forward")
    # the activation constraints were active while tracing (mesh + rules context entered by sharded_jit)
    text = fwd.lower(variables, xs, ls).as_text()
    assert "sharding_constraint" in text or "@Sharding" in text
    plain = jax.jit(TinyNet().apply).lower(reference_variables, x, labels).as_text()
    assert "sharding_constraint" not in plain and "@Sharding" not in plain


# (4) sharded SGD step == single-device step ---------------------------------------------------------------
def _sgd_step(variables, x, labels, target, lr=0.1):
    def loss_fn(v):
        return jnp.mean((TinyNet().apply(v, x, labels) - target) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(variables)
    return jax.tree_util.tree_map(lambda p, g: p - lr * g, variables, grads), loss


def test_sharded_sgd_step_matches(mesh222, sharded, reference_variables, inputs):
    x, labels, target = inputs
    _, shardings, variables = sharded
    ref_vars, ref_loss = jax.jit(_sgd_step)(reference_variables, x, labels, target)
    bs = sh.batch_sharding
    step = sh.sharded_jit(_sgd_step, in_shardings=(shardings, bs(mesh222, 4), bs(mesh222, 1), bs(mesh222, 4)),
                          out_shardings=(shardings, sh.replicated(mesh222)), mesh=mesh222)
    new_vars, loss = step(variables, *sh.shard_batch((x, labels, target), mesh222))
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, what="loss")
    ref = _flat(ref_vars)
    for k, arr in _flat(new_vars).items():
        assert arr.sharding.spec == EXPECTED_SPECS[k], k
        assert_close(arr, ref[k], atol=1e-5, rtol=0, what=f"updated {k}")
    # the step moved the params, so the comparison above is not trivially old == old
    moved = ref["params/ff_in/kernel"] - _flat(reference_variables)["params/ff_in/kernel"]
    assert float(jnp.max(jnp.abs(moved))) > 1e-4


# (5) uneven dims -------------------------------------------------------------------------------------------
class Uneven(nn.Module):
    @nn.compact
    def __call__(self, x):
        return layers.dense(5, name="proj", axes=("mlp", "embed"))(x)  # embed dim 5 over fsdp=2


def test_uneven_dim_raises_or_replicates(mesh222):
    x = jnp.zeros((2, 8))
    with pytest.raises(ValueError, match=r"(?s)2 param dim.*params/proj/bias: dim 0 of shape \(5,\).*"
                                         r"params/proj/kernel: dim 1 of shape \(8, 5\) is not divisible by 2"
                                         r".*allow_replicate_uneven=True"):
        sh.param_shardings(Uneven(), x, mesh=mesh222)
    _, shardings = sh.param_shardings(Uneven(), x, mesh=mesh222, allow_replicate_uneven=True)
    assert _flat(shardings)["params/proj/kernel"].spec == P("tensor", None)
    assert _flat(shardings)["params/proj/bias"].spec == P(None)
    variables = sh.init_sharded(Uneven(), jax.random.key(1), x, mesh=mesh222, allow_replicate_uneven=True)
    assert _flat(variables)["params/proj/kernel"].addressable_shards[0].data.shape == (4, 5)


# (6) batches ----------------------------------------------------------------------------------------------
def test_shard_batch_leading_axis_over_data_fsdp(mesh222):
    batch = {"image": np.arange(8 * 2 * 2 * 3, dtype=np.float32).reshape(8, 2, 2, 3),
             "ids": np.arange(8, dtype=np.int32)}
    out = sh.shard_batch(batch, mesh222)
    assert sh.batch_sharding(mesh222, 4).spec == P(("data", "fsdp"), None, None, None)
    assert out["image"].sharding == NamedSharding(mesh222, P(("data", "fsdp"), None, None, None))
    assert out["ids"].sharding.spec == P(("data", "fsdp"))
    # 4 batch shards of 2 rows, each held by the 2 devices of one tensor group
    rows = sorted({tuple(np.asarray(s.data).tolist()) for s in out["ids"].addressable_shards})
    assert rows == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert all(s.data.shape == (2, 2, 2, 3) for s in out["image"].addressable_shards)
    np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
    with pytest.raises(ValueError, match=r"batch leaf ids has leading dim 6, not divisible by data×fsdp = 4"):
        sh.shard_batch({"ids": np.arange(6)}, mesh222)
    assert sh.replicated(mesh222).spec == P()


def _tiny_unet_on_mesh():
    """The tiny UNet, a batch of 4, a data=2 × fsdp=2 × tensor=2 mesh and the UNet's param shardings on it."""
    from dynamicid_jax import sharding as S
    from dynamicid_jax.models import unet as U

    module = U.UNet2DConditionModel(U.unet_config("tiny"))
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    t = np.array([1, 200, 500, 900], np.int32)
    ctx = rng.standard_normal((4, 5, 32)).astype(np.float32)
    mesh = S.make_mesh(S.MeshConfig(data=2, fsdp=2, tensor=2))
    _, shardings = S.param_shardings(module, sample[:1], t[:1], ctx[:1], mesh=mesh)
    return module, (sample, t, ctx), mesh, shardings


def test_unet_params_follow_rules():
    """The real UNet (tiny widths) on a data=2 × fsdp=2 × tensor=2 mesh of the 8 virtual CPU devices: every param
    is placed as its logical axes and the rules table say (zeros of the right shapes: placement only)."""
    import flax.linen as nn

    from dynamicid_jax import sharding as S

    module, (sample, t, ctx), mesh, shardings = _tiny_unet_on_mesh()
    boxed = jax.eval_shape(module.init, jax.random.key(0), sample[:1], t[:1], ctx[:1])["params"]
    params = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), nn.meta.unbox(boxed))
    sharded = S.shard_params(params, shardings["params"])
    specs = nn.get_partition_spec(boxed)
    rules = dict(S.LOGICAL_AXIS_RULES)
    flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_arrays = dict(jax.tree_util.tree_leaves_with_path(sharded))
    assert len(flat_specs) == len(flat_arrays) > 100
    for path, logical in flat_specs:
        expected = jax.sharding.PartitionSpec(*(rules.get(name) for name in logical))
        assert flat_arrays[path].sharding.spec == expected, jax.tree_util.keystr(path)


@pytest.mark.slow  # ~50 s of CPU compile; the default run checks a sharded train step (tests/test_train_loop.py)
def test_unet_sharded_forward_equals_unsharded():
    from dynamicid_jax import sharding as S
    from dynamicid_jax.models import unet as U

    module, (sample, t, ctx), mesh, shardings = _tiny_unet_on_mesh()
    params = jax.tree_util.tree_map(  # host-side: eager jnp here would compile a kernel per param shape
        lambda x: (np.asarray(x) + 0.01 * np.sin(np.arange(x.size).reshape(x.shape))).astype(np.float32),
        U.init_params(module, jax.random.key(0)))
    reference = jax.jit(module.apply)({"params": params}, sample, t, ctx)
    sharded = S.shard_params(params, shardings["params"])
    batch = S.shard_batch({"s": sample, "t": t, "c": ctx}, mesh)
    forward = S.sharded_jit(module.apply, in_shardings=(shardings, S.batch_sharding(mesh, 4),
                                                        S.batch_sharding(mesh, 1), S.batch_sharding(mesh, 3)),
                            out_shardings=S.batch_sharding(mesh, 4), mesh=mesh)
    out = forward({"params": sharded}, batch["s"], batch["t"], batch["c"])
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), atol=2e-5, rtol=1e-5)
