"""`python -m infer.convert`: official-layout ``SAA.bin`` / ``IMR.bin`` / ``key_point_encoder.bin`` (written with
``torch.save`` from the PyTorch re-expressions with the official key names) → our folder → the pipeline, with
parity against the PyTorch modules; atomic output; errors."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_sd
from conftest import assert_close

import dynamicid_jax.faces as F
from dynamicid_jax.models.clip import clip_preprocess
from dynamicid_jax.models.unet import UNetConfig, unet_config
from dynamicid_jax.pipelines.dynamicid import DynamicIDPipeline, load_dynamicid
from dynamicid_jax.tokenizer import tokenize
from dynamicid_jax.weights import keymap as km
from dynamicid_jax.methods import dynamicid_official as official
from infer import convert

RANK = 4  # as tests/test_dynamicid_pipeline.py, so both files share the compiled sampler


@pytest.fixture(scope="session")
def torch_modules(torch):
    """PyTorch modules with the official key names, sized for the tiny SD (cross-attention 32, text 32); the
    official modules fix head_dim = 64, so the importers infer every config from the shapes."""
    import torch_reference as tr
    import torch_reference_saa as trs
    from diffusers import UNet2DConditionModel

    enc = tr.randomize_(tr.ProjPlusModel(id_embed_dim=128, num_tokens=4, dim=32, clip_dim=48, depth=1, heads=1,
                                         head_dim=64), seed=11).eval()
    torch.manual_seed(12)
    unet = UNet2DConditionModel(**tiny_sd.UNET)
    unet.set_attn_processor(trs.saa_processors(unet, RANK))
    saa_module = torch.nn.ModuleList(unet.attn_processors.values())
    with torch.no_grad():  # trained-looking LoRA ups (fresh ones are zero)
        for name, p in saa_module.named_parameters():
            if ".up." in name:
                p.copy_(torch.randn_like(p) * 0.05)
    imr_model = tr.randomize_(tr.IMR(dim=64, heads=1, head_dim=64, embedding_dim=32, txt_dim=32), seed=13).eval()
    kpe = tr.KeyPointEncoder(embedding_dim=32)
    rasters = [torch.from_numpy(np.stack([F.raster_from_landmarks(np.random.default_rng(s + i).uniform(
        100, 400, (106, 2))) for i in range(4)]).transpose(0, 3, 1, 2)) for s in (0, 10)]
    tr.calibrate_batchnorm_(tr.randomize_(kpe, seed=14), rasters)  # O(1) activations through the deep stack
    return enc, saa_module, imr_model, kpe


@pytest.fixture(scope="session")
def bins(torch, torch_modules, tmp_path_factory):
    enc, saa_module, imr_model, kpe = torch_modules
    folder = tmp_path_factory.mktemp("official_bins")
    torch.save({"proj_module": enc.state_dict(), "SAA_module": saa_module.state_dict()}, folder / "SAA.bin")
    torch.save(imr_model.state_dict(), folder / "IMR.bin")
    torch.save(kpe.state_dict(), folder / "key_point_encoder.bin")
    return folder


@pytest.fixture(scope="session")
def converted(bins, tiny_sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "dynamicid"
    assert convert.main(["--saa", str(bins / "SAA.bin"), "--imr", str(bins / "IMR.bin"), "--unet-config",
                         tiny_sd_dir, "--out", str(out)]) == 0  # key_point_encoder.bin found beside IMR.bin
    return str(out)


class FixedAnalyzer:
    """One preset face with a 128-d embedding and 106 landmarks (in the analysed image's pixels)."""

    embedding_dim, num_landmarks = 128, 106

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        v = rng.normal(size=128)
        self.face = F.Face(bbox=[20, 20, 120, 140], kps=rng.uniform(30, 110, (5, 2)), landmarks=rng.uniform(
            20, 120, (106, 2)), embedding=v / np.linalg.norm(v), pose=[12.0, -3.0, 0.0], det_score=0.9)

    def analyze(self, image):
        h, w = F.load_rgb(image).shape[:2]  # landmarks scale with the image (the raster resizes it to 512²)
        f = self.face
        s = np.array([w / 160, h / 160], np.float32)
        return [F.Face(bbox=f.bbox, kps=f.kps * s, landmarks=f.landmarks * s, embedding=f.embedding, pose=f.pose,
                       det_score=f.det_score)]


def test_converted_folder_holds_the_official_weights(converted, bins, torch_modules):
    enc, saa_module, imr_model, kpe = torch_modules
    weights = load_dynamicid(converted)
    assert weights.saa.lora_rank == RANK and weights.has_imr
    assert weights.saa_unet_config == UNetConfig.from_dict(tiny_sd.UNET)
    # exporting back to the official layout gives the torch tensors bit for bit
    for ours, ref in ((official.export_saa(weights.saa_params, weights.saa_unet_config), saa_module.state_dict()),
                      (official.export_id_encoder(weights.id_encoder_params), enc.state_dict()),
                      (official.export_imr(weights.imr_params), imr_model.state_dict())):
        assert set(ours) == set(ref)
        for k, v in ref.items():
            np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)
    stats = official.export_keypoint_encoder(weights.keypoint_encoder_variables)
    for k, v in kpe.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(stats[k], v.numpy(), err_msg=k)


def test_pipeline_on_converted_weights_matches_torch(torch, converted, torch_modules, tiny_sd_dir, tmp_path):
    enc, _, imr_model, kpe = torch_modules
    pipe = DynamicIDPipeline.from_pretrained(tiny_sd_dir, converted, analyzer=FixedAnalyzer(),
                                             clip_vision_path=tiny_sd.make_tiny_clip_vision(tmp_path / "clip"))
    ref = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    tokens = pipe.encode_identities([ref])
    # the PyTorch encoder on the same inputs: the analyzer's embedding and CLIP's penultimate features
    feats = pipe.image_encoder.apply({"params": pipe.image_encoder_params},
                                     jnp.asarray(clip_preprocess([ref], size=32))).hidden_states[-2]
    face = pipe.analyzer.analyze(ref)[0]
    with torch.no_grad():
        expected = enc(torch.from_numpy(face.embedding[None]), torch.from_numpy(np.array(feats))).numpy()
    assert_close(tokens, expected, 1e-4, 1e-4, "ID tokens from the converted SAA.bin")
    print(f"\nID tokens: max |ours - torch| = {float(np.abs(np.asarray(tokens) - expected).max()):.2e}")

    prompt = "a very surprised expression, front view"
    edited = pipe.encode_identities([ref], [prompt])
    raster = F.landmark_raster(ref, pipe.analyzer)
    ids = jnp.asarray(tokenize(pipe.sd.tokenizer, [F.auto_face_prompt(face.pose), prompt]))
    pooled = np.asarray(pipe.sd.text_encoder.apply({"params": pipe.sd.params["text_encoder"]}, ids).pooler_output)
    with torch.no_grad():
        lmk = kpe(torch.from_numpy(np.stack([raster, raster]).transpose(0, 3, 1, 2))).reshape(2, -1)
        t = torch.from_numpy(pooled.copy())
        expected = imr_model(torch.from_numpy(np.array(tokens)), lmk[:1], lmk[1:], t[:1], t[1:]).numpy()
    assert_close(edited, expected, 1e-4, 1e-4, "IMR-edited tokens from the converted IMR.bin")
    print(f"IMR-edited tokens: max |ours - torch| = {float(np.abs(np.asarray(edited) - expected).max()):.2e}")

    image = pipe("a photo of a person", [ref], steps=2, height=64, width=64, seed=0)
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8 and np.std(image) > 1.0


def test_unet_config_sources(tiny_sd_dir, tmp_path):
    tiny = UNetConfig.from_dict(tiny_sd.UNET)
    assert convert.resolve_unet_config("sd15") == unet_config("sd15")
    assert convert.resolve_unet_config(tiny_sd_dir) == tiny
    assert convert.resolve_unet_config(os.path.join(tiny_sd_dir, "unet")) == tiny
    assert convert.resolve_unet_config(os.path.join(tiny_sd_dir, "unet", "config.json")) == tiny
    with pytest.raises(FileNotFoundError):
        convert.resolve_unet_config(str(tmp_path))


def test_errors_leave_no_output(bins, converted, tiny_sd_dir, tmp_path, torch):
    out = tmp_path / "out"
    saa = str(bins / "SAA.bin")
    with pytest.raises(FileExistsError, match="already exists"):
        convert.main(["--saa", saa, "--unet-config", tiny_sd_dir, "--out", converted])
    assert load_dynamicid(converted).has_imr  # untouched
    other = dict(tiny_sd.UNET, block_out_channels=[32, 64, 128])  # another UNet: the mid block is 128 wide
    with open(tmp_path / "config.json", "w") as f:
        json.dump(other, f)
    with pytest.raises(km.WeightLoadError, match=r"(?s)16 wrong-shape key.*mid_block"):
        convert.main(["--saa", saa, "--unet-config", str(tmp_path / "config.json"), "--out", str(out)])
    os.remove(tmp_path / "config.json")
    with pytest.raises(ValueError, match="--imr as well"):
        convert.main(["--saa", saa, "--key-point-encoder", str(bins / "key_point_encoder.bin"), "--unet-config",
                      tiny_sd_dir, "--out", str(out)])
    torch.save({"not": torch.zeros(2)}, tmp_path / "IMR.bin")
    with pytest.raises(FileNotFoundError, match="KeyPointEncoder"):  # no key_point_encoder.bin beside it
        convert.main(["--saa", saa, "--imr", str(tmp_path / "IMR.bin"), "--unet-config", tiny_sd_dir,
                      "--out", str(out)])
    with pytest.raises(km.WeightLoadError):  # a broken IMR.bin fails after the SAA part was imported
        convert.main(["--saa", saa, "--imr", str(tmp_path / "IMR.bin"), "--key-point-encoder",
                      str(bins / "key_point_encoder.bin"), "--unet-config", tiny_sd_dir, "--out", str(out)])
    assert sorted(os.listdir(tmp_path)) == ["IMR.bin"], "no output and no temporary folder left behind"
    # SAA only (no face-prompt editing), then --overwrite replaces the folder
    assert convert.main(["--saa", saa, "--unet-config", tiny_sd_dir, "--out", str(out)]) == 0
    assert not load_dynamicid(out).has_imr
    assert convert.main(["--saa", saa, "--imr", str(bins / "IMR.bin"), "--unet-config", tiny_sd_dir, "--out",
                         str(out), "--overwrite"]) == 0
    assert load_dynamicid(out).has_imr
    assert sorted(os.listdir(tmp_path)) == ["IMR.bin", "out"]


def test_an_empty_folder_may_be_written_a_foreign_one_not(tmp_path):
    """An existing empty folder holds nothing to destroy, so converting into it is allowed (a stage runner or a user
    may create the output folder first); a folder with anything of someone else's is refused, overwrite or not."""
    from dynamicid_jax.pipelines.dynamicid import check_overwritable

    empty = tmp_path / "empty"
    empty.mkdir()
    check_overwritable(str(empty), overwrite=False)
    check_overwritable(str(empty), overwrite=True)
    (empty / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError):
            check_overwritable(str(empty), overwrite=overwrite)
    assert (empty / "notes.txt").read_text() == "mine"
