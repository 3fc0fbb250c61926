"""build_shards end to end with the real dlib backend on real photographs, plus precomputed VAE moments and CLIP
features from tiny random models saved in the real formats; the loaders' precomputed-feature paths.

Photos: crops of the group photo that ships in the ``insightface`` package (``t1.jpg``), two crops per person for
three people, plus a face-less image. Skips only when dlib / insightface are not installed."""
import dataclasses
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from data_pipelines import build_shards as B
from data_pipelines import loaders as L
from data_pipelines import schema as S
from data_pipelines import shards as SH
from dynamicid_jax import faces as F
from dynamicid_jax.models import clip as C
from dynamicid_jax.models import vae as V
from dynamicid_jax.weights.keymap import export_state_dict, write_safetensors

RES = 32
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=1, norm_num_groups=8, sample_size=64)
VISION = C.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8, projection_dim=16)


def _group_photo():
    pytest.importorskip("dlib")
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the test photos ship in the insightface package, which is not installed")
    return F.load_rgb(os.path.join(list(spec.submodule_search_locations)[0], "data", "images", "t1.jpg"))


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory):
    photo = _group_photo()
    h, w = photo.shape[:2]
    small = np.asarray(Image.fromarray(photo).resize((640, 443), Image.Resampling.BILINEAR))
    found = sorted(F.get_analyzer("dlib").analyze(small), key=lambda f: f.bbox[0])
    assert len(found) == 6
    root = tmp_path_factory.mktemp("photos")
    scale = w / 640
    for k, face in enumerate(found[:3]):
        x0, y0, x1, y1 = face.bbox * scale
        size = x1 - x0
        folder = root / f"person{k}"
        folder.mkdir()
        for j, (half, shift) in enumerate(((1.0, 0.0), (1.6, 0.15))):
            cx, cy, r = (x0 + x1) / 2 + shift * size, (y0 + y1) / 2, size * half
            crop = photo[int(max(0, cy - r)):int(min(h, cy + r)), int(max(0, cx - r)):int(min(w, cx + r))]
            Image.fromarray(crop).save(folder / f"{j}.jpg", quality=95)
        (folder / "0.txt").write_text(f"a photo of person {k}")
    (root / "nobody").mkdir()
    Image.fromarray(np.full((120, 160, 3), (90, 140, 200), np.uint8)).save(root / "nobody" / "sky.png")
    return root


def _random_params(abstract, seed):
    """Random values for an abstract param tree (no init compile): N(0, 0.2²), LayerNorm / GroupNorm scales 1."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: (np.ones(a.shape, np.float32) if str(path[-1]).find("scale") >= 0 else
                         (rng.standard_normal(a.shape) * 0.2).astype(np.float32)), abstract)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    cfg = V.VAEConfig.from_dict(VAE)
    os.makedirs(root / "sd" / "vae")
    (root / "sd" / "vae" / "config.json").write_text(json.dumps(cfg.to_dict()))
    write_safetensors(V.export_vae_state_dict(_random_params(V.abstract_params(V.AutoencoderKL(cfg)), 0)),
                      str(root / "sd" / "vae" / "diffusion_pytorch_model.safetensors"))
    model = C.CLIPVisionModelWithProjection(VISION)
    params = _random_params(jax.eval_shape(model.init, jax.random.key(1), np.zeros((1, 32, 32, 3), np.float32)
                                           )["params"], 1)
    os.makedirs(root / "clip")
    (root / "clip" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model",
                                                           **dataclasses.asdict(VISION)}))
    write_safetensors(export_state_dict(params, C.VISION_KEYMAP), str(root / "clip" / "model.safetensors"))
    return root


@pytest.fixture(scope="session")
def built(photo_tree, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("photo_shards")
    manifest = B.build_shards(photo_tree, out, "dlib", analyzer_kwargs={"upsample": 0},
                              latents=str(tiny_models / "sd"), clip_vision=str(tiny_models / "clip"),
                              resolution=RES, images_per_shard=4, encode_batch_size=4, progress=False)
    return SH.open_shards(out), manifest


def test_dlib_records(built):
    data, m = built
    assert m.num_records == 6 and m.skipped == {"no_face": 1}
    assert [e.name for e in m.identities] == ["nobody", "person0", "person1", "person2"]
    assert [len(e.records) for e in m.identities] == [0, 2, 2, 2]
    assert m.raw["analyzer"] == {"name": "dlib", "embedding_dim": 128, "num_landmarks": 68}
    recs = list(data.records())
    for r in recs:
        w, h = r.image_size
        assert r.landmarks.shape == (68, 2) and r.embedding.shape == (128,) and r.image_format == "jpeg"
        assert np.all((r.landmarks >= -5) & (r.landmarks <= [w + 5, h + 5]))
        assert r.face_prompt == F.auto_face_prompt(r.pose) and r.face_prompt_source == "auto"
        assert r.kps[0, 0] < r.kps[2, 0] < r.kps[1, 0]
    assert [r.caption for r in recs] == ["a photo of person 0", "", "a photo of person 1", "", "a photo of person 2",
                                         ""]
    emb = np.stack([r.embedding for r in recs])
    dist = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    same = [dist[i, i + 1] for i in (0, 2, 4)]
    different = [dist[i, j] for i in range(6) for j in range(6) if i // 2 != j // 2]
    assert max(same) < 0.1 and min(different) > 0.4, (same, min(different))
    # the aligned 112 crops of the same person look alike (ArcFace alignment of both crops)
    a, b = (recs[0].decode_face_crop().astype(float), recs[1].decode_face_crop().astype(float))
    assert np.abs(a - b).mean() < 25


def test_precomputed_features_match_the_models(built, tiny_models):
    data, m = built
    assert m.latents["shape"] == [4, 4, 8] and m.latents["resolution"] == RES
    assert m.latents["scaling_factor"] == pytest.approx(0.18215) and m.latents["dtype"] == "float32"
    assert m.clip_features["shape"] == [17, 32] and m.clip_features["layer"] == "penultimate"
    vae, vparams = V.load_vae(str(tiny_models / "sd"))
    cmodel, cparams = C.load_image_encoder(str(tiny_models / "clip"))
    recs = list(data.records())[:4]  # the build's encode batch size: the same compiled programs
    images = [r.decode_image() for r in recs]
    crops = np.stack([S.to_signed_unit(S.resize_center_crop(im, RES)) for im in images])
    moments = np.asarray(jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode").moments)(vparams, crops))
    feats = np.asarray(jax.jit(lambda p, x: cmodel.apply({"params": p}, x).hidden_states[-2])(
        cparams, C.clip_preprocess(images, size=32)))
    for j, r in enumerate(recs):
        assert r.latent_resolution == RES and r.latent_moments.shape == (4, 4, 8)
        np.testing.assert_allclose(r.latent_moments, moments[j], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(r.clip_features, feats[j], atol=1e-4, rtol=1e-4)
    assert np.std(moments[..., :4]) > 1e-3  # non-trivial values


def test_loaders_use_precomputed_features(built):
    data, _ = built
    cfg = L.Stage1Config(batch_size=3, resolution=RES, seed=0, process_index=0, process_count=1)
    batch = next(iter(L.stage1_loader(data, cfg)))
    assert S.validate_stage1_batch(batch, resolution=RES) == 3
    assert batch["target_latent_moments"].shape == (3, 4, 4, 8) and batch["ref_clip_features"].shape == (3, 17, 32)
    for j in range(3):
        t, r = int(batch["target_index"][j]), int(batch["ref_index"][j])
        assert t != r and t // 2 == r // 2  # another photo of the same person
        np.testing.assert_array_equal(batch["target_latent_moments"][j], data.record(t).latent_moments)
        np.testing.assert_array_equal(batch["ref_clip_features"][j], data.record(r).clip_features)
        np.testing.assert_array_equal(batch["ref_id_embedding"][j], data.record(r).embedding)
    ex = next(iter(L.stage2_loader(data, L.Stage2Config(num_targets=4, resolution=RES, process_index=0,
                                                          process_count=1))))
    assert S.validate_stage2_example(ex, num_targets=4, resolution=RES) == 4
    assert ex["tgt_latent_moments"].shape == (4, 4, 4, 8) and "tgt_pixels" not in ex
    # pixels on request, or when the configured resolution differs from the precomputed one ("auto")
    pix = next(iter(L.stage1_loader(data, dataclasses.replace(cfg, latents="pixels", clip="pixels"))))
    assert pix["target_pixels"].shape == (3, RES, RES, 3) and pix["ref_clip_pixels"].shape == (3, 224, 224, 3)
    other = next(iter(L.stage1_loader(data, dataclasses.replace(cfg, resolution=16))))
    assert other["target_pixels"].shape == (3, 16, 16, 3) and "ref_clip_features" in other
    with pytest.raises(ValueError, match="computed at resolution 32, the loader is configured for 16"):
        L.stage1_loader(data, dataclasses.replace(cfg, resolution=16, latents="precomputed"))
