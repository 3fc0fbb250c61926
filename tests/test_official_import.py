"""Official ``.bin`` checkpoints: safe loading (torch and torch-free paths), importers, errors, converted format."""
import io
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from dynamicid_jax.methods import id_encoder as ide
from dynamicid_jax.methods import imr
from dynamicid_jax.methods import dynamicid_official as official
from dynamicid_jax.methods import dynamicid_weights
from dynamicid_jax.weights import torch_pickle
from dynamicid_jax.weights.keymap import WeightLoadError

# head_dim 64 as in the official modules, so that the importers can infer the whole config from the file
ENC = ide.id_encoder_config("tiny", dim=128, heads=2, head_dim=64)
IMR_CFG = imr.imr_config("tiny")
BACKENDS = ["torch", "restricted"]


@pytest.fixture(scope="session")
def torch_models(torch):
    import torch_reference as tr

    enc = tr.randomize_(tr.ProjPlusModel(id_embed_dim=ENC.id_embed_dim, num_tokens=ENC.num_tokens, dim=ENC.dim,
                                         clip_dim=ENC.clip_dim, depth=ENC.depth, heads=ENC.heads,
                                         head_dim=ENC.head_dim), seed=5).eval()
    # "full-width heads": the official modules fix head_dim = 64, so an importer without a config must infer it
    imr_model = tr.randomize_(tr.IMR(dim=128, heads=2, head_dim=64, embedding_dim=32, txt_dim=24,
                                     disentangle_depth=1, entangle_depth=2), seed=6).eval()
    kpe = tr.randomize_(tr.KeyPointEncoder(embedding_dim=32), seed=7).eval()
    return enc, imr_model, kpe


@pytest.fixture(scope="session")
def checkpoints(torch, torch_models, tmp_path_factory):
    """The three official files, written with ``torch.save`` exactly as the official scripts do."""
    enc, imr_model, kpe = torch_models
    folder = tmp_path_factory.mktemp("official")
    saa_module = torch.nn.ModuleList([torch.nn.Linear(4, 6, bias=False) for _ in range(2)])  # stands in for SAA
    torch.save({"proj_module": enc.state_dict(), "SAA_module": saa_module.state_dict()}, folder / "SAA.bin")
    torch.save(imr_model.state_dict(), folder / "IMR.bin")
    torch.save(kpe.state_dict(), folder / "key_point_encoder.bin")
    return folder


@pytest.mark.parametrize("backend", BACKENDS)
def test_safe_load_reads_official_files(torch, torch_models, checkpoints, backend):
    enc, imr_model, kpe = torch_models
    saa = official.read_saa_bin(str(checkpoints / "SAA.bin"), backend=backend)
    assert set(saa) == {"proj_module", "SAA_module"} and set(saa["SAA_module"]) == {"0.weight", "1.weight"}
    for loaded, model in ((saa["proj_module"], enc),
                          (torch_pickle.safe_torch_load(str(checkpoints / "IMR.bin"), backend=backend), imr_model),
                          (torch_pickle.safe_torch_load(str(checkpoints / "key_point_encoder.bin"),
                                                        backend=backend), kpe)):
        ref = model.state_dict()
        assert set(loaded) == set(ref)
        for k, v in ref.items():
            assert loaded[k].dtype == v.numpy().dtype, k
            np.testing.assert_array_equal(loaded[k], v.numpy(), err_msg=k)


def test_auto_backend_without_torch(torch_models, checkpoints, monkeypatch):
    """With torch not importable, "auto" falls back to the restricted reader."""
    import sys

    _, imr_model, _ = torch_models
    monkeypatch.setitem(sys.modules, "torch", None)  # makes ``import torch`` raise ImportError
    loaded = torch_pickle.safe_torch_load(str(checkpoints / "IMR.bin"))
    monkeypatch.undo()
    for k, v in imr_model.state_dict().items():
        np.testing.assert_array_equal(loaded[k], v.numpy(), err_msg=k)


def test_restricted_loader_dtypes_views_and_scalars(torch, tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {"f16": torch.randn(3, 2).half(), "bf16": torch.randn(5).bfloat16(), "i64": torch.arange(7),
           "i32": torch.arange(3, dtype=torch.int32), "u8": torch.arange(4, dtype=torch.uint8),
           "bool": torch.tensor([True, False]), "f64": torch.randn(2, dtype=torch.float64),
           "scalar": torch.tensor(3), "column": base[:, 2], "transposed": base.t(), "view_of_same_storage": base[1:],
           "empty": torch.zeros(0, 3), "nested": [torch.ones(2), {"deep": torch.full((1,), 2.0)}]}
    torch.save(obj, tmp_path / "mixed.bin")
    ours = torch_pickle.safe_torch_load(str(tmp_path / "mixed.bin"), backend="restricted")
    via_torch = torch_pickle.safe_torch_load(str(tmp_path / "mixed.bin"), backend="torch")
    for name in obj:
        if name == "nested":
            continue
        expected = obj[name].float().numpy() if name == "bf16" else obj[name].numpy()
        for got in (ours[name], via_torch[name]):
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            np.testing.assert_array_equal(got, expected, err_msg=name)
    np.testing.assert_array_equal(ours["nested"][1]["deep"], [2.0])
    assert ours["bf16"].dtype == np.float32  # widened


def _malicious_archive(path, payload) -> None:
    """A torch-zip-shaped file whose data.pkl calls ``payload`` while unpickling."""
    class Evil:
        def __reduce__(self):
            return payload

    buf = io.BytesIO()
    pickle.dump({"weight": Evil()}, buf, protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, backend):
    marker = tmp_path / "pwned"
    cases = {
        "os_system.bin": (os.system, (f"touch {marker}",)),
        "exec.bin": (exec, (f"open({str(marker)!r}, 'w').write('x')",)),
    }
    for name, payload in cases.items():
        _malicious_archive(tmp_path / name, payload)
        with pytest.raises(torch_pickle.UnsafeCheckpointError, match="refused to load"):
            torch_pickle.safe_torch_load(str(tmp_path / name), backend=backend)
        assert not marker.exists(), f"the payload of {name} ran"
    # a bare pickle (no zip): torch rejects it the same way; the torch-free path refuses the format
    raw = tmp_path / "raw.bin"
    evil = type("Evil", (), {"__reduce__": lambda self: cases["os_system.bin"]})()
    raw.write_bytes(pickle.dumps({"w": evil}, protocol=2))
    with pytest.raises(WeightLoadError):
        torch_pickle.safe_torch_load(str(raw), backend=backend)
    assert not marker.exists()
    # positive control: plain unpickling of the same bytes does run the payload
    with zipfile.ZipFile(tmp_path / "os_system.bin") as z:
        pickle.loads(z.read("archive/data.pkl"))
    assert marker.exists()


def test_restricted_loader_rejects_unknown_globals(tmp_path):
    """Even a harmless-looking non-tensor global (a class outside the allow-list) is refused."""
    buf = io.BytesIO()
    pickle.dump({"w": np.dtype("float32")}, buf, protocol=2)  # references numpy.dtype
    with zipfile.ZipFile(tmp_path / "np.bin", "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match="numpy"):
        torch_pickle.safe_torch_load(str(tmp_path / "np.bin"), backend="restricted")
    with pytest.raises(FileNotFoundError):
        torch_pickle.safe_torch_load(str(tmp_path / "missing.bin"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_official_files_end_to_end(torch, torch_models, checkpoints, backend):
    enc, imr_model, kpe = torch_models
    rng = np.random.default_rng(0)

    module, params = official.load_official_id_encoder(str(checkpoints / "SAA.bin"), backend=backend)
    assert module.config == ENC
    e = rng.standard_normal((1, ENC.id_embed_dim)).astype(np.float32)
    clip = rng.standard_normal((1, 5, ENC.clip_dim)).astype(np.float32)
    with torch.no_grad():
        ref = enc(torch.from_numpy(e), torch.from_numpy(clip)).numpy()
    ours = jax.jit(module.apply)({"params": params}, jnp.asarray(e), jnp.asarray(clip))
    assert_close(ours, ref, atol=1e-4, rtol=1e-4, what="ID encoder from SAA.bin")

    module, params = official.load_official_imr(str(checkpoints / "IMR.bin"), backend=backend)
    assert (module.config.dim, module.config.heads, module.config.txt_dim, module.config.disentangle_depth,
            module.config.entangle_depth) == (128, 2, 24, 1, 2)
    tokens = rng.standard_normal((1, 4, 32)).astype(np.float32)
    lmk = np.abs(rng.standard_normal((3, 32))).astype(np.float32)
    txt = rng.standard_normal((3, 24)).astype(np.float32)
    with torch.no_grad():
        t = lambda a: torch.from_numpy(a)  # noqa: E731
        ref = imr_model(t(tokens), t(lmk[:1]), t(lmk[1:]), t(txt[:1]), t(txt[1:])).numpy()
    ours = jax.jit(module.apply)({"params": params}, tokens, lmk[:1], txt[:1], lmk[1:], txt[1:])
    assert_close(ours, ref, atol=1e-4, rtol=1e-4, what="IMR from IMR.bin")

    kpe_path = official.keypoint_encoder_path_for(str(checkpoints / "IMR.bin"))
    assert kpe_path == str(checkpoints / "key_point_encoder.bin")
    module, variables = official.load_official_keypoint_encoder(kpe_path, backend=backend)
    assert module.config.embedding_dim == 32
    assert set(variables) == {"params", "batch_stats"}
    stats = variables["batch_stats"]["blocks_3_1"]["bn"]
    np.testing.assert_array_equal(stats["var"], kpe.state_dict()["blocks.3.1.conv_block.1.running_var"].numpy())


def test_export_round_trip(torch, torch_models):
    import torch_reference as tr

    enc, imr_model, kpe = torch_models
    for model, importer, exporter, config in (
            (enc, official.import_id_encoder, official.export_id_encoder, ENC),
            (imr_model, official.import_imr, official.export_imr, None)):
        state = tr.state_dict_numpy(model)
        _, params = importer(state, config)
        back = exporter(params)
        assert set(back) == set(state)
        for k in state:
            np.testing.assert_array_equal(back[k], state[k], err_msg=k)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    state = tr.state_dict_numpy(kpe)
    _, variables = official.import_keypoint_encoder(state)
    back = official.export_keypoint_encoder(variables)
    assert set(back) == set(state)
    for k in state:
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[k], state[k], err_msg=k)
    tr.KeyPointEncoder(embedding_dim=32).load_state_dict({k: torch.from_numpy(v) for k, v in back.items()},
                                                         strict=True)


def test_mismatched_state_dicts_are_reported(torch_models):
    import torch_reference as tr

    enc, imr_model, kpe = torch_models
    state = tr.state_dict_numpy(enc)
    broken = dict(state)
    del broken["perceiver_resampler.layers.1.0.to_kv.weight"]
    broken["perceiver_resampler.layers.1.0.to_k.weight"] = state["perceiver_resampler.layers.1.0.to_kv.weight"]
    broken["norm.weight"] = np.ones(7, np.float32)
    with pytest.raises(WeightLoadError) as err:
        official.import_id_encoder(broken, ENC, source="broken.bin")
    msg = str(err.value)
    assert "broken.bin" in msg and "1 missing" in msg and "perceiver_resampler.layers.1.0.to_kv.weight" in msg
    assert "1 unexpected" in msg and "to_k.weight" in msg and "norm.weight: file (7,)" in msg

    state = tr.state_dict_numpy(imr_model)
    with pytest.raises(WeightLoadError, match="missing key"):
        official.import_imr({k: v for k, v in state.items() if not k.startswith("feature_fusion")})
    with pytest.raises(WeightLoadError, match="entangleNet.1.2.3.weight"):
        official.import_imr(state, imr.imr_config("tiny", dim=128, heads=2, head_dim=64, txt_dim=24,
                                                  entangle_depth=1))

    state = tr.state_dict_numpy(kpe)
    with pytest.raises(WeightLoadError, match="blocks.2.3.conv_block.1.running_var"):
        official.import_keypoint_encoder({k: v for k, v in state.items() if k != "blocks.2.3.conv_block.1.running_var"})
    with pytest.raises(WeightLoadError, match="not tensors"):
        official.import_keypoint_encoder({**state, "extra": "text"})
    # shapes cannot reveal a head size other than the official 64: a config is then required
    small_heads = tr.ProjPlusModel(id_embed_dim=8, dim=32, clip_dim=16, depth=1, heads=2, head_dim=16)
    with pytest.raises(WeightLoadError, match="not a multiple of the head size 64"):
        official.import_id_encoder(tr.state_dict_numpy(small_heads))


def test_read_saa_bin_requires_both_parts(torch, torch_models, tmp_path):
    enc, _, _ = torch_models
    torch.save({"proj_module": enc.state_dict()}, tmp_path / "SAA.bin")
    with pytest.raises(WeightLoadError, match="expected top-level keys 'proj_module' and 'SAA_module'"):
        official.read_saa_bin(str(tmp_path / "SAA.bin"))


def test_converted_round_trip(torch_models, tmp_path):
    import torch_reference as tr

    enc, imr_model, kpe = torch_models
    items = [official.import_id_encoder(tr.state_dict_numpy(enc), ENC),
             official.import_imr(tr.state_dict_numpy(imr_model)),
             official.import_keypoint_encoder(tr.state_dict_numpy(kpe))]
    for (config, params), name in zip(items, ("id_encoder", "imr", "keypoint_encoder")):
        path = dynamicid_weights.save_converted(params, config, str(tmp_path))
        assert path == str(tmp_path / f"{name}.safetensors")
        got_config, got = dynamicid_weights.load_converted(str(tmp_path), name)
        assert got_config == config
        flat_a = jax.tree_util.tree_leaves_with_path(params)
        flat_b = dict(jax.tree_util.tree_leaves_with_path(got))
        assert len(flat_a) == len(flat_b)
        for p, v in flat_a:
            np.testing.assert_array_equal(flat_b[p], v)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]  # atomic writes leave nothing behind
    # a config that does not describe the stored tensors is caught
    config, params = items[0]
    dynamicid_weights.save_converted(params, config, str(tmp_path), name="other")
    json_path = tmp_path / "other.json"
    json_path.write_text(json_path.read_text().replace('"depth": 2', '"depth": 3'))
    with pytest.raises(WeightLoadError, match="missing"):
        dynamicid_weights.load_converted(str(tmp_path), "other")
    with pytest.raises(WeightLoadError, match="wrong shape"):
        bad_config = ide.id_encoder_config("tiny", dim=128, heads=2, head_dim=64, clip_dim=40)
        dynamicid_weights.save_converted(params, bad_config, str(tmp_path), name="bad")
    with pytest.raises(FileNotFoundError, match="no converted weights named 'nothing'"):
        dynamicid_weights.load_converted(str(tmp_path), "nothing")
