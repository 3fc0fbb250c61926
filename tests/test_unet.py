"""UNet: parity with diffusers, weight-map round trip, attention order, strategies, errors."""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from dynamicid_jax.models import unet as U
from dynamicid_jax.models.layers import StandardAttention
from dynamicid_jax.weights import keymap as km

TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)


@pytest.fixture(scope="session")
def tiny_unet_dir(tmp_path_factory, torch):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY).eval()
    with torch.no_grad():  # diffusers zero-inits some layers; randomise everything so parity is meaningful
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("unet")
    model.save_pretrained(path, safe_serialization=True)
    return str(path), model


@pytest.fixture(scope="session")
def loaded(tiny_unet_dir):
    return U.load_unet(tiny_unet_dir[0])


def _inputs(batch=2, hw=16, seq=7, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, hw, hw, 4)).astype(np.float32),
            np.array([10, 700][:batch], np.int32),
            rng.standard_normal((batch, seq, dim)).astype(np.float32))


def _torch_eps(model, torch, sample, t, ctx):
    with torch.no_grad():
        out = model(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(t.astype(np.int64)),
                    torch.from_numpy(ctx)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def test_parity_with_diffusers(tiny_unet_dir, loaded, torch):
    model = tiny_unet_dir[1]
    unet, params = loaded
    sample, t, ctx = _inputs()
    ours = jax.jit(unet.apply)({"params": params}, sample, t, ctx)
    ref = _torch_eps(model, torch, sample, t, ctx)
    assert_close(ours, ref, atol=1e-4, rtol=1e-4, what="UNet eps")


def test_parity_linear_projection_and_head_list(tmp_path, torch):
    from diffusers import UNet2DConditionModel

    cfg = dict(TINY, use_linear_projection=True, attention_head_dim=(2, 4, 4), upcast_attention=True,
               transformer_layers_per_block=(1, 2, 1))
    torch.manual_seed(1)
    model = UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path, safe_serialization=True)
    unet, params = U.load_unet(str(tmp_path))
    sample, t, ctx = _inputs(seed=3)
    assert_close(jax.jit(unet.apply)({"params": params}, sample, t, ctx), _torch_eps(model, torch, sample, t, ctx),
                 what="UNet (linear projection, head list, 2-layer transformer)")


def test_keymap_round_trip(tiny_unet_dir, loaded):
    from safetensors.numpy import load_file

    saved = load_file(os.path.join(tiny_unet_dir[0], "diffusion_pytorch_model.safetensors"))
    exported = km.export_state_dict(loaded[1], U.UNET_KEYMAP)
    assert sorted(exported) == sorted(saved)
    for k, v in saved.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_weights_are_read_and_placed_tensor_by_tensor(tiny_unet_dir, monkeypatch):
    """A folder's weights are opened lazily (only headers at first); loading reads each tensor exactly once and
    places it before the next one is read, so host memory never holds the whole checkpoint twice; the placed
    params equal the eager read of the file."""
    from safetensors.numpy import load_file

    events = []
    real_getitem = km.LazyStateDict.__getitem__

    def recording_getitem(self, key):
        events.append(("read", key))
        return real_getitem(self, key)

    monkeypatch.setattr(km.LazyStateDict, "__getitem__", recording_getitem)
    path = os.path.join(tiny_unet_dir[0], "diffusion_pytorch_model.safetensors")
    state = km.LazyStateDict(path)
    assert events == [] and len(state) > 100
    with open(os.path.join(tiny_unet_dir[0], "config.json")) as f:
        module = U.UNet2DConditionModel(U.UNetConfig.from_dict(json.load(f)))
    placed = km.load_state_dict(state, U.UNET_KEYMAP, U.abstract_params(module), source=path,
                                place=lambda x: events.append(("place", x.shape)) or x)
    kinds = [e[0] for e in events]
    assert kinds == ["read", "place"] * len(state)
    assert sorted(e[1] for e in events if e[0] == "read") == sorted(state)
    exported = km.export_state_dict(placed, U.UNET_KEYMAP)
    for key, value in load_file(path).items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.parametrize("damage", ["truncated", "junk"])
def test_damaged_weights_file_is_one_clear_error(tiny_unet_dir, tmp_path, damage):
    """A folder whose safetensors file is cut short or is not safetensors at all: ``load_unet`` raises
    ``WeightLoadError`` naming the file (the lazy reader checks the file when the folder is opened)."""
    import shutil

    folder = tmp_path / "unet"
    shutil.copytree(tiny_unet_dir[0], folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not safetensors" * 10)
    with pytest.raises(km.WeightLoadError, match="diffusion_pytorch_model.safetensors"):
        U.load_unet(str(folder))


def test_attention_order_matches_diffusers(tiny_unet_dir):
    model = tiny_unet_dir[1]
    theirs = [k.removesuffix(".processor") for k in model.attn_processors]
    assert U.attention_layer_names(U.UNetConfig.from_dict(dict(model.config))) == theirs


def test_sd15_attention_order_matches_spec():
    names = U.attention_layer_names(U.unet_config("sd15"))
    assert len(names) == 32
    assert names[0].startswith("down_blocks.0") and names[3].startswith("down_blocks.0")
    assert names[8].startswith("down_blocks.2") and names[12].startswith("up_blocks.1")
    assert names[24].startswith("up_blocks.3") and names[30] == "mid_block.attentions.0.transformer_blocks.0.attn1"
    assert all(n.endswith("attn1") == (i % 2 == 0) for i, n in enumerate(names))


def test_sd15_param_count_eval_shape():
    assert km.count_params(U.abstract_params(U.UNet2DConditionModel(U.unet_config("sd15")))) == 859_520_964


@dataclasses.dataclass(frozen=True)
class ExtraTokenCrossAttention:
    """A decoupled extra-token branch (IP-Adapter style): the last ``n_extra`` context tokens get their own K/V
    projections and are added with ``inputs["scale"]``. Records which layers it ran in via sow."""

    n_extra: int

    def __call__(self, attn, proj, hidden, context, inputs):
        if attn.info.kind == "self":
            return StandardAttention()(attn, proj, hidden, context, inputs)
        text, extra = context[:, :-self.n_extra], context[:, -self.n_extra:]
        q = attn.split_heads(proj.q(hidden))
        h_txt = attn.attend(q, attn.split_heads(proj.k(text)), attn.split_heads(proj.v(text)))
        k_x = nn.Dense(q.shape[-2] * q.shape[-1], use_bias=False, name="to_k_extra")(extra)
        v_x = nn.Dense(q.shape[-2] * q.shape[-1], use_bias=False, name="to_v_extra")(extra)
        h_x = attn.attend(q, attn.split_heads(k_x), attn.split_heads(v_x))
        attn.sow("intermediates", "layer_index", jnp.asarray(attn.info.index))
        return proj.out(attn.merge_heads(h_txt + inputs["scale"] * h_x))


@pytest.mark.slow  # kept out of the default run for its 10-minute budget (make test-slow runs it)
def test_strategy_plugs_in_without_copying_the_unet():
    config = U.UNetConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                          attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    base = U.UNet2DConditionModel(config)
    custom = U.UNet2DConditionModel(config, strategy=ExtraTokenCrossAttention(n_extra=3))
    sample, t, ctx = _inputs(hw=8)
    extra = np.random.default_rng(5).standard_normal((2, 3, 32)).astype(np.float32)
    full_ctx = np.concatenate([ctx, extra], axis=1)
    params = nn.meta.unbox(jax.jit(custom.init)(jax.random.key(1), sample, t, full_ctx, {"scale": 1.0})["params"])
    # the strategy's parameters live inside each cross-attention layer, next to the unchanged base names
    flat = km.traverse_util.flatten_dict(params)
    n_cross = len(U.attention_layer_names(config)) // 2
    assert sum(1 for k in flat if k[-2] in ("to_k_extra", "to_v_extra")) == 2 * n_cross
    base_params = km.traverse_util.unflatten_dict({k: v for k, v in flat.items() if "_extra" not in k[-2]})
    reference = jax.jit(base.apply)({"params": base_params}, sample, t, ctx)
    run = jax.jit(lambda p, s: custom.apply(p, sample, t, full_ctx, {"scale": s}, mutable=["intermediates"]))
    off, state = run({"params": params}, 0.0)
    assert_close(off, reference, atol=1e-5, what="scale 0 reproduces the base UNet")
    on, _ = run({"params": params}, 1.0)
    assert float(jnp.abs(on - reference).max()) > 1e-3
    seen = sorted(int(v) for v in jax.tree_util.tree_leaves(state["intermediates"]))
    assert seen == list(range(1, 2 * n_cross, 2))  # every attn2, in diffusers' processor order


def test_bad_inputs(tmp_path, tiny_unet_dir, loaded):
    unet, params = loaded
    with pytest.raises(FileNotFoundError, match="does not exist"):
        U.load_unet(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="Hub id"):
        U.load_unet("runwayml/stable-diffusion-v1-5")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(dict(TINY)))
    with pytest.raises(FileNotFoundError, match="no weights"):
        U.load_unet(str(empty))
    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(dict(TINY, frobnicate=3)))
    with pytest.raises(ValueError, match="frobnicate"):
        U.load_unet(str(bad))
    from safetensors.numpy import load_file, save_file

    state = load_file(os.path.join(tiny_unet_dir[0], "diffusion_pytorch_model.safetensors"))
    state["conv_in.weight"] = np.zeros((32, 4, 5, 5), np.float32)
    del state["conv_out.bias"]
    state["extra.weight"] = np.zeros(3, np.float32)
    shapes = tmp_path / "shapes"
    shapes.mkdir()
    (shapes / "config.json").write_text(json.dumps(dict(TINY)))
    save_file(state, str(shapes / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(km.WeightLoadError) as e:
        U.load_unet(str(shapes))
    msg = str(e.value)
    assert "conv_in.weight" in msg and "conv_out.bias" in msg and "extra.weight" in msg
    assert "diffusion_pytorch_model.safetensors" in msg
    sample, t, ctx = _inputs()
    with pytest.raises(ValueError, match="multiples of 4"):
        unet.apply({"params": params}, sample[:, :10, :10], t, ctx)
