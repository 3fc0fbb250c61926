"""Shard building (fake analyzer reading per-image sidecars), manifest, resume, CLI, and the Grain loaders.

The fake backend is registered only while a build runs (the face tests check the registry's contents)."""
import contextlib
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from data_pipelines import build_shards as B
from data_pipelines import loaders as L
from data_pipelines import schema as S
from data_pipelines import shards as SH
from dynamicid_jax import faces as F
from dynamicid_jax.faces import analyzer as analyzer_mod

from face_tree import EMB_DIM, SidecarAnalyzer, write_tree

RES = 32


@contextlib.contextmanager
def _registered(name, factory):
    analyzer_mod.register_backend(name, factory, overwrite=True)
    try:
        yield
    finally:
        analyzer_mod._REGISTRY.pop(name, None)


@pytest.fixture(scope="session")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("faces_in"))


@pytest.fixture(scope="session")
def built(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("faces_out")
    analyzer = SidecarAnalyzer()
    manifest = B.build_shards(tree, out, analyzer, images_per_shard=3, progress=False,
                              default_caption="a photo of a person")
    return out, manifest, analyzer


@pytest.fixture(scope="session")
def dataset(built):
    return SH.open_shards(built[0])


# ---------------------------------------------------------------------------------------------- building

def test_manifest(built):
    out, m, analyzer = built
    assert len(analyzer.calls) == 10  # every image except the unreadable one reached the analyzer
    assert m.num_records == 8 and m.num_identities == 5
    assert [e.name for e in m.identities] == ["alice", "bob", "carol", "dave", "erin"]
    assert [e.records for e in m.identities] == [(0, 1, 2), (3, 4), (5, 6), (), (7,)]
    assert [e.num_images for e in m.identities] == [3, 4, 2, 1, 1]
    assert m.skipped == {"no_face": 2, "unreadable": 1}
    assert sorted((s["key"], s["reason"]) for s in m.raw["skipped_files"]) == [
        ("bob/b2.png", "no_face"), ("bob/broken.jpg", "unreadable"), ("dave/d0.png", "no_face")]
    assert m.raw["counts"] == {"images_found": 11, "multiple_faces_used_largest": 1, "sidecar_face_prompts": 1,
                               "captions": 8}
    assert m.raw["analyzer"] == {"name": "sidecar-fake", "embedding_dim": 16, "num_landmarks": 68}
    assert m.embedding_dim == 16 and m.latents is None and m.clip_features is None
    assert m.raw["record_schema_version"] == S.SCHEMA_VERSION
    assert [s["file"] for s in m.shards] == [f"faces-0000{i}-of-00004.array_record" for i in range(4)]
    assert [s["num_records"] for s in m.shards] == [3, 2, 2, 1]
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    np.testing.assert_array_equal(m.record_identities(), [0, 0, 0, 1, 1, 2, 2, 4])


def test_records(tree, dataset):
    recs = list(dataset.records())
    assert [r.key for r in recs] == ["alice/a0.png", "alice/a1.jpg", "alice/a2.png", "bob/b0.png", "bob/b1.png",
                                     "carol/c0.png", "carol/c1.png", "erin/e0.png"]
    a0, a1, a2 = recs[:3]
    assert (a0.face_prompt, a0.face_prompt_source) == ("in a sad expression, in front view", "sidecar")
    assert (a1.face_prompt, a1.face_prompt_source) == ("in a neutral expression, in side view", "auto")
    assert (a2.face_prompt, a2.expression) == ("in a surprise expression, facing up, in front view", "surprise")
    assert recs[6].face_prompt == "in a neutral expression, facing down, in front view"
    assert [r.caption for r in recs] == ["a photo of a person", "alice on a beach", "alice, json caption",
                                         "bob smiling", "a photo of a person", "carol", "a photo of a person",
                                         "a photo of a person"]
    for r in recs:
        assert r.image == (tree / r.key).read_bytes()  # original file bytes kept
        assert r.image_format == ("jpeg" if r.key.endswith(".jpg") else "png")
        assert r.decode_image().shape == (r.image_size[1], r.image_size[0], 3)
        assert r.decode_face_crop().shape == (112, 112, 3)
        assert r.analyzer == "sidecar-fake" and r.embedding.shape == (EMB_DIM,) and r.landmarks.shape == (68, 2)
        assert r.latent_moments is None and r.clip_features is None
    np.testing.assert_array_equal(recs[5].bbox, [10, 10, 50, 50])  # carol: the largest of two faces
    np.testing.assert_array_equal(a1.pose, [0, 30, 0])
    # the aligned crop is the ArcFace warp of the image
    np.testing.assert_array_equal(a1.decode_face_crop(), F.align_face(a1.decode_image(), a1.kps))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_rerun_skips_finished_shards(tree, built, tmp_path):
    out = _copy(built[0], tmp_path / "out")
    again = SidecarAnalyzer()
    m = B.build_shards(tree, out, again, images_per_shard=3, progress=False, default_caption="a photo of a person")
    assert again.calls == [] and m.raw == built[1].raw
    # an edited caption invalidates only its shard (bob/b0 is in shard 1: b0, b1, b2)
    tree2 = _copy(tree, tmp_path / "in")
    (tree2 / "bob" / "b0.txt").write_text("bob frowning")
    os.remove(out / "faces-00003-of-00004.json")  # a shard without its summary is rebuilt too
    third = SidecarAnalyzer()
    m2 = B.build_shards(tree2, out, third, images_per_shard=3, progress=False, default_caption="a photo of a person")
    assert third.calls == ["b0.png", "b1.png", "b2.png", "d0.png", "e0.png"]
    assert SH.open_shards(out).record(3).caption == "bob frowning" and m2.num_records == 8
    # different options (another default caption) → everything is rebuilt
    fourth = SidecarAnalyzer()
    B.build_shards(tree2, out, fourth, images_per_shard=3, progress=False)
    assert len(fourth.calls) == 10


def test_interrupted_build_resumes(tree, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="analyzer crashed"):
        B.build_shards(tree, out, SidecarAnalyzer(fail_on="c0.png"), images_per_shard=3, progress=False)
    assert sorted(os.listdir(out)) == [f"faces-0000{i}-of-00004.{ext}" for i in (0, 1) for ext in ("array_record",
                                                                                                   "json")]
    resumed = SidecarAnalyzer()
    m = B.build_shards(tree, out, resumed, images_per_shard=3, progress=False)
    assert resumed.calls == ["c0.png", "c1.png", "d0.png", "e0.png"] and m.num_records == 8


def test_strict_skips_multi_face_images(tree, tmp_path):
    m = B.build_shards(tree, tmp_path / "out", SidecarAnalyzer(), strict=True, progress=False)
    assert m.skipped == {"no_face": 2, "unreadable": 1, "multiple_faces": 1}
    assert m.num_records == 7 and len(m.shards) == 1


def test_cli_with_registered_backend(tree, tmp_path, capsys):
    with _registered("sidecar-fake", lambda tag="": SidecarAnalyzer()):
        m = B.main(["--images", str(tree), "--out", str(tmp_path / "cli"), "--analyzer", "sidecar-fake",
                    "--analyzer-arg", "tag=1", "--images-per-shard", "100", "--no-progress"])
    assert m.num_records == 8 and len(m.shards) == 1
    assert "8 records of 5 identities in 1 shard(s)" in capsys.readouterr().out
    assert "sidecar-fake" not in F.available_backends()
    with pytest.raises(ValueError, match="unknown face-analysis backend 'nope'"):
        B.main(["--images", str(tree), "--out", str(tmp_path / "x"), "--analyzer", "nope"])


def test_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images found .* \{identity\}/\{image\}"):
        B.build_shards(tmp_path / "empty", tmp_path / "o", SidecarAnalyzer())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        B.build_shards(tmp_path / "missing", tmp_path / "o", SidecarAnalyzer())
    bad = tmp_path / "bad" / "zed"
    bad.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad / "z.png")
    (bad / "z.json").write_text(json.dumps({"faces": [], "expression": "bored"}))
    with pytest.raises(ValueError, match="z.png.*unknown expression 'bored'"):
        B.build_shards(tmp_path / "bad", tmp_path / "o", SidecarAnalyzer(), progress=False)
    with pytest.raises(FileNotFoundError, match="manifest.json.*not a face-shard folder"):
        SH.open_shards(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- loaders

def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_stage1_batches(dataset):
    from dynamicid_jax.models.clip import clip_preprocess

    cfg = L.Stage1Config(batch_size=4, resolution=RES, seed=3, process_index=0, process_count=1)
    batches = _take(L.stage1_loader(dataset, cfg), 4)
    members = {e.id: set(e.records) for e in dataset.manifest.identities}
    for batch in batches:
        assert S.validate_stage1_batch(batch, resolution=RES) == 4
        assert sorted(batch) == ["identity", "input_ids", "ref_clip_pixels", "ref_id_embedding", "ref_index",
                                 "target_face_box", "target_index", "target_pixels"]
        assert batch["target_face_box"].shape == (4, 4)
        assert np.all(batch["target_face_box"][:, 2:] > batch["target_face_box"][:, :2])  # y1 > y0, x1 > x0
        assert batch["target_pixels"].min() >= -1 and batch["target_pixels"].max() <= 1
        for j in range(4):
            t, r = int(batch["target_index"][j]), int(batch["ref_index"][j])
            ident = int(batch["identity"][j])
            assert t in members[ident] and r in members[ident]
            assert (t != r) == (len(members[ident]) > 1)  # a different image whenever there is one
            target, ref = dataset.record(t), dataset.record(r)
            np.testing.assert_array_equal(batch["target_pixels"][j],
                                          S.to_signed_unit(S.resize_center_crop(target.decode_image(), RES)))
            np.testing.assert_array_equal(batch["ref_clip_pixels"][j], clip_preprocess(ref.decode_image())[0])
            np.testing.assert_array_equal(batch["ref_id_embedding"][j], ref.embedding)
            np.testing.assert_array_equal(batch["input_ids"][j], L.tokenize_cached(target.caption))
    assert batches[0]["input_ids"][0, 0] == 49406  # BOS of the CLIP tokenizer


def _stream(dataset, **kw):
    cfg = L.Stage1Config(batch_size=1, resolution=RES, clip_size=32, **kw)
    return [(int(b["target_index"][0]), int(b["ref_index"][0])) for b in _take(L.stage1_loader(dataset, cfg), 16)]


def test_stage1_epochs_determinism_and_process_sharding(dataset):
    g = _stream(dataset, seed=5, process_index=0, process_count=1)
    assert g == _stream(dataset, seed=5, process_index=0, process_count=1)  # deterministic for a seed
    assert [t for t, _ in g] != [t for t, _ in _stream(dataset, seed=6, process_index=0, process_count=1)]
    assert sorted(t for t, _ in g[:8]) == list(range(8)) == sorted(t for t, _ in g[8:])  # each epoch: all once
    assert [t for t, _ in g[:8]] != [t for t, _ in g[8:]]  # reshuffled per epoch
    p0 = _stream(dataset, seed=5, process_index=0, process_count=2)
    p1 = _stream(dataset, seed=5, process_index=1, process_count=2)
    assert p0 == g[0::2] + p0[8:] and p1 == g[1::2] + p1[8:]  # process p gets global elements p, p+2, ...
    assert p0[:8] == g[0::2][:8]


def test_stage1_finite_epochs_and_same_reference_option(dataset):
    cfg = L.Stage1Config(batch_size=3, resolution=RES, num_epochs=1, drop_remainder=False, clip_size=32,
                         distinct_reference=False, process_index=0, process_count=1)
    batches = list(L.stage1_loader(dataset, cfg))
    assert [len(b["identity"]) for b in batches] == [3, 3, 2]
    t = np.concatenate([b["target_index"] for b in batches])
    assert sorted(t.tolist()) == list(range(8))
    np.testing.assert_array_equal(t, np.concatenate([b["ref_index"] for b in batches]))
    # 3 processes, 8 records: each gets 8 // 3 = 2 examples (equal counts, so no process waits for another)
    seen = []
    for p in range(3):
        cfg2 = L.Stage1Config(batch_size=1, resolution=RES, num_epochs=1, clip_size=32, process_index=p,
                              process_count=3)
        seen.append([int(b["target_index"][0]) for b in L.stage1_loader(dataset, cfg2)])
    assert [len(s) for s in seen] == [2, 2, 2] and len(set(sum(seen, []))) == 6


def test_stage2_examples(dataset):
    cfg = L.Stage2Config(num_targets=5, resolution=RES, seed=1, process_index=0, process_count=1)
    examples = _take(L.stage2_loader(dataset, cfg), 8)
    members = {e.id: set(e.records) for e in dataset.manifest.identities}
    assert sorted({int(ex["identity"]) for ex in examples[:4]}) == [0, 1, 2, 4]  # dave (no records) never appears
    for ex in examples:
        assert S.validate_stage2_example(ex, num_targets=5, resolution=RES) == 5
        assert "tgt_pixels" in ex
        ident, src = int(ex["identity"]), int(ex["src_index"])
        assert src in members[ident] and set(ex["tgt_index"].tolist()) <= members[ident]
        srec = dataset.record(src)
        np.testing.assert_array_equal(ex["src_raster"], srec.raster())
        np.testing.assert_array_equal(ex["src_face_prompt_ids"], L.tokenize_cached(srec.face_prompt))
        for j, t in enumerate(ex["tgt_index"]):
            rec = dataset.record(int(t))
            np.testing.assert_array_equal(ex["tgt_rasters"][j], rec.raster())
            np.testing.assert_array_equal(ex["tgt_pixels"][j],
                                          S.to_signed_unit(S.resize_center_crop(rec.decode_image(), RES)))
            np.testing.assert_array_equal(ex["tgt_face_prompt_ids"][j], L.tokenize_cached(rec.face_prompt))
    alice = [ex for ex in examples if int(ex["identity"]) == 0]
    assert any(len(set(ex["tgt_index"].tolist())) < 5 for ex in alice)  # with replacement (3 images, 5 draws)


def test_record_loader(dataset):
    cfg = L.LoaderConfig(clip_size=32, process_index=1, process_count=2)
    batches = list(L.record_loader(dataset, 3, cfg))
    assert [b["index"].tolist() for b in batches] == [[1, 3, 5], [7]]
    assert batches[0]["ref_clip_pixels"].shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(batches[1]["ref_id_embedding"][0], dataset.record(7).embedding)


class _Corrupting:
    """A record source that returns garbage / a broken image for chosen indices."""

    def __init__(self, source, garbage=(), broken_image=()):
        self.source, self.garbage, self.broken = source, set(garbage), set(broken_image)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if i in self.garbage:
            return b"\x00garbage"
        raw = self.source[i]
        if i in self.broken:
            rec = S.decode_record(raw)
            rec.image = rec.image[:20]
            return rec.to_bytes()
        return raw


def test_corrupt_records_are_skipped_and_bounded(dataset):
    bad = SH.FaceDataset(_Corrupting(dataset.source, garbage=[4], broken_image=[6]), dataset.manifest)
    cfg = L.Stage1Config(batch_size=2, resolution=RES, clip_size=32, num_epochs=1, distinct_reference=False,
                         max_corrupt_fraction=0.5, corrupt_grace=4, process_index=0, process_count=1)
    it = iter(L.stage1_loader(bad, cfg))
    batches = list(it)
    assert sorted(np.concatenate([b["target_index"] for b in batches]).tolist()) == [0, 1, 2, 3, 5, 7]
    assert it.stats["seen"] == 8 and it.stats["skipped"] == 2
    assert any("not a msgpack map" in e for e in it.stats["recent_errors"])
    assert any("image: cannot decode" in e for e in it.stats["recent_errors"])
    strict = L.Stage1Config(batch_size=2, resolution=RES, clip_size=32, num_epochs=1, max_corrupt_fraction=0.0,
                            process_index=0, process_count=1)
    with pytest.raises(L.CorruptDataError, match="1 of .* examples were corrupt"):
        list(L.stage1_loader(bad, strict))
    # stage 2: an identity whose draw touches a corrupt record is skipped too
    it2 = iter(L.stage2_loader(bad, L.Stage2Config(num_targets=4, resolution=RES, clip_size=32, num_epochs=2,
                                                     max_corrupt_fraction=1.0, process_index=0, process_count=1)))
    examples = list(it2)
    assert it2.stats["skipped"] >= 1 and len(examples) == 8 - it2.stats["skipped"]
    assert all(4 not in ex["tgt_index"] and 6 not in ex["tgt_index"] for ex in examples)


def test_iterator_checkpoint_with_orbax(dataset, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg = L.Stage1Config(batch_size=2, resolution=RES, clip_size=32, seed=9, process_index=0, process_count=1)
    it = iter(L.stage1_loader(dataset, cfg))
    for _ in range(3):
        next(it)
    state = it.get_state()
    json.dumps(state)  # JSON-able
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = [next(it) for _ in range(3)]
        fresh = iter(L.stage1_loader(dataset, cfg))
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    got = [next(fresh) for _ in range(3)]
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert fresh.stats["seen"] == it.stats["seen"] == 12
    # get_state / set_state directly, on stage 2
    it2 = iter(L.stage2_loader(dataset, L.Stage2Config(num_targets=3, resolution=RES, clip_size=32,
                                                        process_index=0, process_count=1)))
    next(it2)
    s2 = it2.get_state()
    want = next(it2)
    again = iter(L.stage2_loader(dataset, L.Stage2Config(num_targets=3, resolution=RES, clip_size=32,
                                                          process_index=0, process_count=1)))
    again.set_state(s2)
    np.testing.assert_array_equal(next(again)["tgt_index"], want["tgt_index"])


def test_loader_config_errors(dataset):
    with pytest.raises(ValueError, match="latents must be 'auto', 'precomputed' or 'pixels'"):
        L.Stage1Config(latents="yes")
    with pytest.raises(ValueError, match="multiple of 8"):
        L.Stage1Config(resolution=30)
    with pytest.raises(ValueError, match="shards hold no latents"):
        L.stage1_loader(dataset, L.Stage1Config(latents="precomputed", resolution=RES))
    with pytest.raises(ValueError, match="shards hold no CLIP features"):
        L.stage2_loader(dataset, L.Stage2Config(clip="precomputed", resolution=RES))
    with pytest.raises(ValueError, match=r"process_index 2 must lie in \[0, process_count=2\)"):
        L.stage1_loader(dataset, L.Stage1Config(resolution=RES, process_index=2, process_count=2))


# ------------------------------------------------------------------------------------------------ TFDS

def test_tfds_builder_over_the_same_records(built, dataset, tmp_path):
    import subprocess
    import sys

    pytest.importorskip("tensorflow_datasets")
    from data_pipelines import tfds_builder as T

    builder = T.prepare_tfds(built[0], data_dir=tmp_path / "tfds")
    assert builder.info.splits["train"].num_examples == 8
    data = T.open_tfds(data_dir=tmp_path / "tfds")
    assert len(data) == 8 and data.manifest.raw == dataset.manifest.raw
    for i in range(8):
        assert data.source[i] == dataset.source[i]  # index i is record i: the manifest applies unchanged
    cfg = L.Stage1Config(batch_size=4, resolution=RES, clip_size=32, seed=2, process_index=0, process_count=1)
    a, b = _take(L.stage1_loader(data, cfg), 2), _take(L.stage1_loader(dataset, cfg), 2)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # reading back needs neither TensorFlow nor our builder class: plain tfds.data_source in a fresh process
    code = ("import sys, tensorflow_datasets as tfds; "
            f"src = tfds.data_source('dynamicid_faces', split='train', data_dir={str(tmp_path / 'tfds')!r}); "
            "print(len(src), len(src[0]['record']), 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["8", str(len(dataset.source[0])), "False"]


WORKER_SCRIPT = """
import sys

import numpy as np
from absl import flags


def take(folder, workers, n, state=None):
    from data_pipelines import loaders as L

    cfg = L.Stage1Config(batch_size=2, resolution=32, clip_size=32, seed=4, worker_count=workers,
                         process_index=0, process_count=1)
    it = iter(L.stage1_loader(folder, cfg))
    if state is not None:
        it.set_state(state)
    out = [next(it)["target_index"].tolist() for _ in range(n)]
    new_state = it.get_state()
    it.close()
    return out, new_state


def main():
    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
    folder = sys.argv[1]
    serial, _ = take(folder, 0, 6)
    parallel, _ = take(folder, 2, 6)
    assert serial == parallel, (serial, parallel)
    first, state = take(folder, 2, 3)
    rest, _ = take(folder, 2, 3, state)
    assert first + rest == serial, (first, rest, serial)
    print("OK", serial)


if __name__ == "__main__":  # worker processes re-import this module: the guard is required
    main()
"""


@pytest.mark.slow
def test_worker_processes_match_serial_loading(built, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "worker_loader.py"
    script.write_text(WORKER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(script), str(built[0])], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")


def test_exif_rotated_jpeg_is_stored_upright(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(rgb).save(tmp_path / "r.jpg", exif=exif.tobytes())
    Image.fromarray(rgb).save(tmp_path / "p.png")
    upright = F.load_rgb(tmp_path / "r.jpg")
    assert upright.shape == (30, 20, 3)
    data, fmt = B._image_bytes(str(tmp_path / "r.jpg"), upright)
    assert fmt == "png"
    np.testing.assert_array_equal(S.decode_image_bytes(data), upright)
    assert B._image_bytes(str(tmp_path / "p.png"), rgb) == ((tmp_path / "p.png").read_bytes(), "png")
