"""The face record: round trip, compatibility checks, corrupt input; the image transform; the batch contract."""
import io

import msgpack
import numpy as np
import pytest
from PIL import Image

from data_pipelines import schema as S


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _record(**over):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=16).astype(np.float32)
    fields = dict(
        key="alice/0001.png", identity=3, identity_name="alice",
        image=_png(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)), image_format="png", image_size=(30, 20),
        face_crop=_png(np.full((112, 112, 3), 7, np.uint8)), bbox=[1, 2, 11, 14],
        kps=rng.normal(size=(5, 2)), landmarks=rng.normal(size=(68, 2)) * 5 + 10, pose=[3.0, -20.0, 1.0],
        embedding=emb / np.linalg.norm(emb), det_score=0.93, analyzer="dlib", caption="a photo of alice",
        face_prompt="in a happy expression, in side view", face_prompt_source="sidecar", expression="happy")
    fields.update(over)
    return S.FaceRecord(**fields)


def test_round_trip_all_fields():
    moments = np.random.default_rng(1).normal(size=(4, 4, 8)).astype(np.float16)
    clip = np.random.default_rng(2).normal(size=(5, 12)).astype(np.float32)
    rec = _record(latent_moments=moments, latent_resolution=32, clip_features=clip)
    back = S.decode_record(rec.to_bytes())
    for name in ("key", "identity", "identity_name", "image", "image_format", "image_size", "face_crop",
                 "analyzer", "caption", "face_prompt", "face_prompt_source", "expression", "latent_resolution"):
        assert getattr(back, name) == getattr(rec, name), name
    for name in ("bbox", "kps", "landmarks", "pose", "embedding"):
        np.testing.assert_array_equal(getattr(back, name), np.asarray(getattr(rec, name), np.float32))
        assert getattr(back, name).dtype == np.float32
    assert back.latent_moments.dtype == np.float16 and back.clip_features.dtype == np.float32
    np.testing.assert_array_equal(back.latent_moments, moments)
    np.testing.assert_array_equal(back.clip_features, clip)
    assert abs(back.det_score - 0.93) < 1e-12
    assert back.decode_image().shape == (20, 30, 3) and back.decode_face_crop().shape == (112, 112, 3)
    raster = back.raster()
    assert raster.shape == (96, 96, 1) and set(np.unique(raster)) <= {-1.0, 1.0} and (raster == 1).sum() > 0


def test_optional_fields_absent():
    back = S.decode_record(_record(expression=None).to_bytes())
    assert back.latent_moments is None and back.clip_features is None and back.expression is None


def _payload(rec):
    return msgpack.unpackb(rec.to_bytes(), raw=False)


def test_version_checks_and_upgrades(monkeypatch):
    payload = _payload(_record())
    assert payload["schema"] == S.SCHEMA_NAME and payload["version"] == S.SCHEMA_VERSION == 1
    future = dict(payload, version=S.SCHEMA_VERSION + 1)
    with pytest.raises(S.RecordVersionError, match="version 2 is newer than this library supports"):
        S.decode_record(msgpack.packb(future, use_bin_type=True))
    old = dict(payload, version=0)
    old.pop("face_prompt_source")
    with pytest.raises(S.RecordVersionError, match="version 0 is not supported"):
        S.decode_record(msgpack.packb(old, use_bin_type=True))
    # the upgrade path: an old-version payload runs through the registered upgrade first
    monkeypatch.setitem(S._UPGRADES, 0, lambda p: {**p, "version": 1, "face_prompt_source": "auto"})
    assert S.decode_record(msgpack.packb(old, use_bin_type=True)).face_prompt_source == "auto"
    # unknown extra keys of the same version are ignored (adding optional fields needs no version bump)
    extra = dict(payload, some_new_field=[1, 2])
    assert S.decode_record(msgpack.packb(extra, use_bin_type=True)).key == "alice/0001.png"


@pytest.mark.parametrize("mutate, match", [
    (lambda p: b"\xc1garbage", "not a msgpack map"),
    (lambda p: msgpack.packb([1, 2]), "not a face record"),
    (lambda p: msgpack.packb({**p, "schema": "other"}, use_bin_type=True), "schema 'other'"),
    (lambda p: msgpack.packb({k: v for k, v in p.items() if k != "embedding"}, use_bin_type=True),
     "lacks fields: embedding"),
    (lambda p: msgpack.packb({**p, "kps": {**p["kps"], "data": p["kps"]["data"][:-4]}}, use_bin_type=True),
     "'kps': 36 data bytes"),
    (lambda p: msgpack.packb({**p, "pose": {**p["pose"], "shape": [4], "data": b"\0" * 16}}, use_bin_type=True),
     "'pose': expected shape"),
    (lambda p: msgpack.packb({**p, "version": "1"}, use_bin_type=True), "no integer 'version'"),
    (lambda p: msgpack.packb({**p, "image_size": [30]}, use_bin_type=True), "image_size"),
])
def test_corrupt_records(mutate, match):
    data = mutate(_payload(_record()))
    with pytest.raises(S.CorruptRecordError, match=match):
        S.decode_record(data)


def test_encode_rejects_bad_fields():
    with pytest.raises(ValueError, match="'landmarks': expected shape"):
        _record(landmarks=np.zeros((68, 3))).to_bytes()
    with pytest.raises(ValueError, match="image_format"):
        _record(image_format="gif").to_bytes()
    with pytest.raises(ValueError, match="latent_resolution"):
        _record(latent_moments=np.zeros((2, 2, 8), np.float32)).to_bytes()
    with pytest.raises(ValueError, match="dtype float64"):
        _record(latent_moments=np.zeros((2, 2, 8)), latent_resolution=16).to_bytes()


def test_corrupt_image_bytes():
    rec = S.decode_record(_record(image=b"\xff\xd8\xff\xe0 not really a jpeg").to_bytes())
    with pytest.raises(S.CorruptRecordError, match="image: cannot decode"):
        rec.decode_image()


def test_resize_center_crop():
    # a 40 (w) x 60 (h) image whose columns / rows are distinguishable
    img = np.zeros((60, 40, 3), np.uint8)
    img[:, :, 0] = np.arange(40, dtype=np.uint8)[None, :] * 6
    img[:, :, 1] = np.arange(60, dtype=np.uint8)[:, None] * 4
    out = S.resize_center_crop(img, 20)  # shortest side 40 → 20 (x0.5): 20 x 30, crop rows 5..25
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    ref = np.asarray(Image.fromarray(img).resize((20, 30), Image.Resampling.BILINEAR))[5:25]
    np.testing.assert_array_equal(out, ref)
    assert S.resize_center_crop(img[:40], 40).shape == (40, 40, 3)  # already square at size: untouched
    np.testing.assert_array_equal(S.resize_center_crop(img[:40], 40), img[:40])
    wide = S.resize_center_crop(np.transpose(img, (1, 0, 2)), 20)
    assert wide.shape == (20, 20, 3)
    x = S.to_signed_unit(np.array([0, 255], np.uint8))
    assert x.dtype == np.float32 and x.tolist() == [-1.0, 1.0]


def _stage1(b=2, r=16, latents=False, clip=False):
    batch = {"ref_id_embedding": np.zeros((b, 8), np.float32), "input_ids": np.zeros((b, 77), np.int32),
             "identity": np.zeros((b,), np.int32)}
    batch.update({"target_latent_moments": np.zeros((b, r // 8, r // 8, 8), np.float32)} if latents else
                 {"target_pixels": np.zeros((b, r, r, 3), np.float32)})
    batch.update({"ref_clip_features": np.zeros((b, 257, 1280), np.float32)} if clip else
                 {"ref_clip_pixels": np.zeros((b, 224, 224, 3), np.float32)})
    return batch


def test_validate_stage1_batch():
    assert S.validate_stage1_batch(_stage1(), resolution=16) == 2
    assert S.validate_stage1_batch(_stage1(3, latents=True, clip=True), resolution=16) == 3
    with pytest.raises(ValueError, match="exactly one of target_pixels, target_latent_moments"):
        S.validate_stage1_batch({**_stage1(), "target_latent_moments": np.zeros((2, 2, 2, 8), np.float32)})
    with pytest.raises(ValueError, match="'input_ids': expected dtype int32"):
        S.validate_stage1_batch({**_stage1(), "input_ids": np.zeros((2, 77), np.int64)})
    with pytest.raises(ValueError, match=r"'target_pixels': expected shape \[2, 32, 32, 3\]"):
        S.validate_stage1_batch(_stage1(), resolution=32)
    latents16 = _stage1(3, latents=True, clip=True)  # 2×2 latents of a 16 px image: an 8× VAE
    with pytest.raises(ValueError, match="target_latent_moments"):
        S.validate_stage1_batch(latents16, resolution=16, vae_scale_factor=4)  # a 4× VAE expects 4×4


def test_validate_stage2_example():
    t = 3
    ex = {"src_raster": np.zeros((96, 96, 1), np.float32), "tgt_rasters": np.zeros((t, 96, 96, 1), np.float32),
          "src_face_prompt_ids": np.zeros(77, np.int32), "tgt_face_prompt_ids": np.zeros((t, 77), np.int32),
          "tgt_latent_moments": np.zeros((t, 2, 2, 8), np.float32), "src_index": np.int32(0),
          "tgt_index": np.zeros(t, np.int32), "identity": np.int32(1)}
    assert S.validate_stage2_example(ex, resolution=16) == 3
    with pytest.raises(ValueError, match=r"'tgt_rasters': expected shape \[4, 96, 96, 1\]"):
        S.validate_stage2_example(ex, num_targets=4)
    bad = {k: v for k, v in ex.items() if k != "tgt_latent_moments"}
    with pytest.raises(ValueError, match="exactly one of tgt_latent_moments, tgt_pixels"):
        S.validate_stage2_example(bad)
