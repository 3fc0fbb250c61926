"""DynamicID inference end to end on tiny random weights: real dlib faces on real photos, single / multi-ID, layouts,
IMR edits, gates + overlay, ``id_scale=0`` = plain text-to-image, errors, and the CLI.

Everything runs at 64×64 with 2 DDIM steps; all calls of one shape share one compiled sampler. Reference photos:
two faces cropped from ``t1.jpg`` that ships inside the ``insightface`` package, analysed by dlib (real weights,
128-d embeddings — so the tiny ID encoder takes 128-d input)."""
import dataclasses
import hashlib
import importlib.util
import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from PIL import Image

import dynamicid_jax.faces as F
from dynamicid_jax.methods import id_encoder as ide
from dynamicid_jax.methods import imr
from dynamicid_jax.methods import saa as S
from dynamicid_jax.models.unet import UNetConfig, attention_layer_names
from dynamicid_jax.pipelines.dynamicid import DynamicIDPipeline, DynamicIDWeights, load_dynamicid, save_dynamicid
from dynamicid_jax.pipelines.gates import GateMaps, gate_overlay_image, save_gate_overlay
from dynamicid_jax.tokenizer import tokenize
from dynamicid_jax.weights import keymap as km

from tiny_sd import VISION, make_tiny_clip_vision

RANK = 4
STEPS = 2
SIZE = 64
ENC = ide.id_encoder_config("tiny", id_embed_dim=128, clip_dim=48)  # dim 32 = the tiny SD's cross-attention
IMR_CFG = imr.imr_config("tiny")  # edits [4, 32] tokens, 32-d pooled text (the tiny SD text encoder)
KPE_CFG = imr.keypoint_encoder_config("tiny")
CROPS = ((218, 0, 451, 231), (222, 374, 499, 651))  # (y0, x0, y1, x1) of two people in t1.jpg (1280×886)
TWO_BOXES = [[0.1, 0.1, 0.5, 0.4], [0.1, 0.6, 0.5, 0.9]]  # the official two-ID example
PROMPT = "a portrait of two people, in a bus"


# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def clip_dir(torch, tmp_path_factory):
    return make_tiny_clip_vision(tmp_path_factory.mktemp("clip_vision_dynamicid"))


def tiny_unet_config(sd_dir) -> UNetConfig:
    return UNetConfig.from_dict(km.read_config(km.find_component(sd_dir, "unet")))


@pytest.fixture(scope="session")
def weights(tiny_sd_dir):
    """Random DynamicID weights: untrained LoRA (up = 0), random ID projections, encoder, IMR, KeyPointEncoder."""
    strategy = S.SAA(lora_rank=RANK)
    unet_config = tiny_unet_config(tiny_sd_dir)
    kpe_vars = imr.keypoint_init_variables(imr.KeyPointEncoder(KPE_CFG), jax.random.key(4))
    return DynamicIDWeights(ENC, ide.init_params(ide.IDEncoder(ENC), jax.random.key(1)), strategy, unet_config,
                            S.init_saa_params(unet_config, jax.random.key(2), strategy),
                            IMR_CFG, imr.init_params(imr.IMR(IMR_CFG), jax.random.key(3)), KPE_CFG, kpe_vars)


@pytest.fixture(scope="session")
def dynamicid_dir(weights, tmp_path_factory):
    return save_dynamicid(tmp_path_factory.mktemp("dynamicid") / "converted", weights)


class CachedAnalyzer:
    """Memoises a real analyzer per image content (dlib is the slow part of these tests)."""

    def __init__(self, inner):
        self.inner, self.embedding_dim, self.num_landmarks = inner, inner.embedding_dim, inner.num_landmarks
        self._cache, self.calls = {}, 0

    def analyze(self, image):
        rgb = F.load_rgb(image)
        key = hashlib.sha1(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()
        if key not in self._cache:
            self.calls += 1
            self._cache[key] = self.inner.analyze(rgb)
        return list(self._cache[key])


@pytest.fixture(scope="session")
def analyzer():
    pytest.importorskip("dlib")
    return CachedAnalyzer(F.get_analyzer("dlib"))


@pytest.fixture(scope="session")
def refs():
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the test photos ship in the insightface package, which is not installed")
    photo = F.load_rgb(os.path.join(list(spec.submodule_search_locations)[0], "data", "images", "t1.jpg"))
    return [np.ascontiguousarray(photo[y0:y1, x0:x1]) for y0, x0, y1, x1 in CROPS]


@pytest.fixture(scope="session")
def pipe(tiny_sd_dir, dynamicid_dir, clip_dir, analyzer):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*68-point analyzer.*")
        return DynamicIDPipeline.from_pretrained(tiny_sd_dir, dynamicid_dir, analyzer=analyzer,
                                                 clip_vision_path=clip_dir)


def run(pipe, refs, **kw):
    kw = {"steps": STEPS, "height": SIZE, "width": SIZE, **kw}
    return pipe(kw.pop("prompt", PROMPT), refs, **kw)


@pytest.fixture(scope="session")
def two_id(pipe, refs):
    return run(pipe, refs, boxes=TWO_BOXES, seed=5, return_gates=True)


class FixedAnalyzer:
    """A test double returning preset faces (128-d, like dlib)."""

    embedding_dim, num_landmarks = 128, 106

    def __init__(self, faces):
        self.faces = faces

    def analyze(self, image):
        return list(self.faces)


def fixed_face(x0, size, seed):
    v = np.random.default_rng(seed).normal(size=128)
    kps = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]]) * size + [x0, 10]
    lmk = np.random.default_rng(seed).uniform(0, size, (106, 2)) + [x0, 10]
    return F.Face(bbox=[x0, 10, x0 + size, 10 + size], kps=kps, landmarks=lmk, embedding=v / np.linalg.norm(v),
                  pose=[0, 0, 0], det_score=0.9)


# ---------------------------------------------------------------------------------------------------------
# folder format
# ---------------------------------------------------------------------------------------------------------
def test_converted_folder_round_trip(weights, dynamicid_dir, tmp_path):
    assert sorted(os.listdir(dynamicid_dir)) == sorted(
        ["dynamicid.json"] + [f"{p}.{e}" for p in ("id_encoder", "saa", "imr", "keypoint_encoder")
                              for e in ("json", "safetensors")])
    loaded = load_dynamicid(dynamicid_dir)
    assert loaded.saa == weights.saa and loaded.saa_unet_config == weights.saa_unet_config
    assert (loaded.id_encoder_config, loaded.imr_config, loaded.keypoint_encoder_config) == (ENC, IMR_CFG, KPE_CFG)
    for a, b in ((loaded.saa_params, weights.saa_params), (loaded.id_encoder_params, weights.id_encoder_params),
                 (loaded.imr_params, weights.imr_params),
                 (loaded.keypoint_encoder_variables, weights.keypoint_encoder_variables)):
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, jax.device_get(b))
    with pytest.raises(FileExistsError, match="already exists"):
        save_dynamicid(dynamicid_dir, weights)
    without_imr = dataclasses.replace(weights, imr_config=None, imr_params=None, keypoint_encoder_config=None,
                                      keypoint_encoder_variables=None)
    assert not load_dynamicid(save_dynamicid(tmp_path / "no_imr", without_imr)).has_imr
    with pytest.raises(FileNotFoundError, match="infer.convert"):
        load_dynamicid(tmp_path)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


# ---------------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------------
def test_single_id_deterministic_and_identity_matters(pipe, refs):
    a = run(pipe, refs[:1], prompt="a photo of a person", seed=1)
    assert a.dtype == np.uint8 and a.shape == (1, SIZE, SIZE, 3) and np.std(a) > 1.0
    compiled = pipe.num_compiled
    np.testing.assert_array_equal(a, run(pipe, refs[:1], prompt="a photo of a person", seed=1))
    other_seed = run(pipe, refs[:1], prompt="a photo of a person", seed=2)
    other_person = run(pipe, refs[1:], prompt="a photo of a person", seed=1)
    assert np.abs(a.astype(int) - other_seed).max() > 0
    assert np.abs(a.astype(int) - other_person).max() > 0, "the identity must change the image"
    assert pipe.num_compiled == compiled, "same shapes reuse the compiled sampler"
    assert "compile_s" not in pipe.last_timings and pipe.last_timings["run_s"] > 0


def test_id_scale_zero_reproduces_text_to_image_exactly(pipe, refs):
    """``id_scale=0`` removes the ID branch exactly. With untrained LoRAs (up = 0, as converted folders from a
    fresh SAA init) the SAA UNet *is* the base UNet, so the result must equal the base StableDiffusion's
    text-to-image bit for bit (same seed, same noise). With trained (non-zero) LoRAs the model differs from the
    base one, and ``id_scale=0`` makes the output independent of the references."""
    kw = dict(prompt="a photo of a person", negative_prompt="blurry", seed=3, guidance_scale=5.0)
    ours = run(pipe, refs[:1], id_scale=0.0, **kw)
    base = pipe.sd.generate(kw["prompt"], negative_prompt="blurry", height=SIZE, width=SIZE, steps=STEPS,
                            guidance_scale=5.0, seed=3)
    np.testing.assert_array_equal(ours, base)
    assert np.abs(run(pipe, refs[:1], **kw).astype(int) - base).max() > 0  # id_scale=1 does change it

    rng = np.random.default_rng(0)
    trained = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
        if any(getattr(k, "key", None) == "up" for k in p) else x, pipe.unet_params)
    lora_pipe = dataclasses.replace(pipe, unet_params=trained)
    with_a = run(lora_pipe, refs[:1], id_scale=0.0, **kw)
    np.testing.assert_array_equal(with_a, run(lora_pipe, refs[1:], id_scale=0.0, **kw))
    assert np.abs(with_a.astype(int) - base).max() > 0, "trained LoRAs change the model"


def test_two_ids_with_boxes_route_and_boost(pipe, two_id, refs):
    images, gates = two_id
    assert images.shape == (1, SIZE, SIZE, 3) and images.dtype == np.uint8
    names = [n for n in attention_layer_names(pipe.unet.config) if n.endswith("attn2")]
    assert isinstance(gates, GateMaps) and len(gates.maps) == len(names) and gates.mode == "route"
    np.testing.assert_allclose(gates.boxes, TWO_BOXES)
    default_s = 2.0  # multi-ID default: s = 2 for 12 steps (all of our 2 steps)
    seen_in_box = 0
    for name, m in gates.maps.items():
        grid = m.shape[1:]
        assert m.shape[0] == 1 and grid == S.layer_grid(grid[0] * grid[1], (SIZE, SIZE))
        inside = np.asarray(S.box_masks(S.box_edges(gates.boxes, grid), grid)).any(0).reshape(grid)
        assert np.all(m[0][inside] >= default_s - 1e-6), name  # boosted: w·(s+1)/(s+1) + s ≥ s
        assert np.all(m[0][~inside] <= 1 / (1 + default_s) + 1e-6), name  # damped: w/(s+1) ≤ 1/3
        seen_in_box += inside.sum()
    assert seen_in_box > 0
    again, gates2 = run(pipe, refs, boxes=TWO_BOXES, seed=5, return_gates=True)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(np.concatenate([g.ravel() for g in gates.maps.values()]),
                                  np.concatenate([g.ravel() for g in gates2.maps.values()]))
    np.testing.assert_array_equal(images, run(pipe, refs, boxes=TWO_BOXES, seed=5))  # gates do not change it
    swapped = run(pipe, refs[::-1], boxes=TWO_BOXES, seed=5)
    assert np.abs(images.astype(int) - swapped).max() > 0, "reference order decides who goes where"
    no_boost = run(pipe, refs, boxes=TWO_BOXES, seed=5, boost_steps=0)
    assert np.abs(images.astype(int) - no_boost).max() > 0


def test_two_ids_layout_spec(pipe, two_id, refs):
    compiled = pipe.num_compiled
    images, gates = run(pipe, refs, layout=[2, 1], seed=5, return_gates=True)
    np.testing.assert_allclose(gates.boxes, S.layout_boxes(2, [2, 1]))
    np.testing.assert_allclose(gates.boxes[0], [0, 0, 1, 2 / 3])
    row = run(pipe, refs, seed=5)  # default: equal strips
    assert np.abs(images.astype(int) - row).max() > 0
    grid = (8, 8)
    top = gates.maps["down_blocks_0/attentions_0/transformer_blocks_0/attn2"][0]
    assert np.all(top[:, :5] >= 2.0 - 1e-6) and np.all(top[:, 5:] >= 2.0 - 1e-6)  # strips cover the image
    assert gates.identity_masks(grid)[0, :, :5].all() and not gates.identity_masks(grid)[0, :, 5:].any()
    assert pipe.num_compiled == compiled, "boxes are traced values: a layout does not recompile"


@pytest.mark.slow  # mixing is its own compiled program (~25 s of CPU compile on a 2-core machine)
def test_mixing_one_box_two_ids(pipe, refs):
    images, gates = run(pipe, refs, boxes=[[0.0, 0.25, 0.75, 1.0]], mix=0.3, seed=5, return_gates=True)
    assert gates.mode == "mix" and images.shape == (1, SIZE, SIZE, 3)
    assert gates.identity_masks((8, 8)).all()
    other = run(pipe, refs, boxes=[[0.0, 0.25, 0.75, 1.0]], mix=0.9, seed=5)
    assert np.abs(images.astype(int) - other).max() > 0


def test_gate_overlay_png(two_id, tmp_path):
    images, gates = two_id
    path = save_gate_overlay(gates, images[0], tmp_path / "gates.png")
    png = np.asarray(Image.open(path).convert("RGB"))
    rows = list(gates.identity_maps().keys())
    assert rows == ["down_blocks_0", "down_blocks_1", "mid_block", "up_blocks_1", "up_blocks_2", "all layers"]
    assert png.shape == (18 + len(rows) * (SIZE + 2), 110 + 2 * (SIZE + 2), 3)
    assert np.array_equal(png, gate_overlay_image(gates, images[0]))

    def panel(row, col):
        y, x = 18 + row * (SIZE + 2), 110 + col * (SIZE + 2)
        return png[y:y + SIZE, x:x + SIZE].astype(int)

    # down_blocks_0 row (8×8 grid: box 0 = px rows 0-32, cols 0-24; box 1 = rows 0-32, cols 32-56): identity 0's
    # box is tinted red in its panel, identity 1's box blue in identity 1's panel, and identity 0 is invisible in
    # identity 1's box (routing)
    img = images[0].astype(int)
    r0, r1 = panel(0, 0), panel(0, 1)
    box0, box1 = np.s_[4:28, 4:20], np.s_[4:28, 36:52]
    redness = lambda a: float(np.mean(a[..., 0] - a[..., 2]))  # noqa: E731
    assert redness(r0[box0]) > redness(img[box0]) + 20
    assert redness(r1[box1]) < redness(img[box1]) - 20
    assert np.abs(r0[box1] - img[box1]).max() <= 1
    with pytest.raises(ValueError, match="px generation"):
        gate_overlay_image(gates, images[0][:32])


def test_edited_expression_is_the_imr_of_the_analysed_face(pipe, refs, analyzer):
    prompt = "a very surprised expression, front view"
    plain = pipe.encode_identities(refs[:1])
    edited = pipe.encode_identities(refs[:1], [prompt])
    assert plain.shape == edited.shape == (1, 4, ENC.dim)
    # the same computation, written out: raster of the 512² resized reference, automatic source prompt from the
    # analysed pose, pooled text of both prompts, KeyPointEncoder in eval mode, IMR
    face = F.reference_face(analyzer, refs[0])
    raster = F.landmark_raster(refs[0], analyzer)
    assert (raster > 0).sum() > 30  # the 68 dlib points landed in the raster
    ids = jnp.asarray(tokenize(pipe.sd.tokenizer, [F.auto_face_prompt(face.pose), prompt]))

    @jax.jit
    def reference(ids, rasters, tokens):
        pooled = pipe.sd.text_encoder.apply({"params": pipe.sd.params["text_encoder"]}, ids).pooler_output
        lmk = pipe.keypoint_encoder.apply(pipe.keypoint_encoder_variables, rasters, train=False)
        return pipe.imr.apply({"params": pipe.imr_params}, tokens, lmk[:1], pooled[:1], lmk[1:], pooled[1:])

    expected = reference(ids, jnp.asarray(np.stack([raster, raster])), plain)
    assert_close(edited, expected, 1e-5, 1e-5, "IMR-edited tokens")
    assert float(jnp.abs(edited - plain).max()) > 1e-3
    other = pipe.encode_identities(refs[:1], ["a happy expression, side view"])
    assert float(jnp.abs(edited - other).max()) > 1e-4
    target = np.full((96, 96, 1), -1.0, np.float32)
    target[40:60, 30:70] = 1.0
    moved = pipe.encode_identities(refs[:1], [prompt], target_landmarks=[target])
    assert float(jnp.abs(edited - moved).max()) > 1e-4
    # two identities, only the second edited: the first keeps its plain tokens
    both = pipe.encode_identities(refs, [None, prompt])
    assert_close(both[0], plain[0], 1e-5, 1e-5, "unedited identity next to an edited one")
    image = run(pipe, refs[:1], face_prompts=[prompt], prompt="a photo of a person", seed=1)
    assert np.abs(image.astype(int) - run(pipe, refs[:1], prompt="a photo of a person", seed=1)).max() > 0


def test_unconditional_tokens(pipe):
    grey = ide.unconditional_clip_pixels(1, VISION["image_size"])

    @jax.jit
    def reference(grey):
        feats = pipe.image_encoder.apply({"params": pipe.image_encoder_params}, grey).hidden_states[-2]
        return ide.unconditional_id_tokens(pipe.id_encoder, pipe.id_encoder_params, feats)

    expected = reference(grey)
    got = pipe.unconditional_tokens(3)
    assert got.shape == (3, 4, ENC.dim)
    for i in range(3):
        assert_close(got[i:i + 1], expected, 1e-6, 1e-6, f"unconditional tokens of identity {i}")


def test_reference_faces(pipe, refs):
    compiled = pipe.num_compiled
    with pytest.raises(F.NoFaceError, match="reference image 1"):
        run(pipe, [refs[0], np.full((160, 160, 3), 128, np.uint8)])
    assert pipe.num_compiled == compiled
    small, large = fixed_face(0, 20, seed=1), fixed_face(30, 60, seed=2)
    two_faces = dataclasses.replace(pipe, analyzer=FixedAnalyzer([small, large]))
    with pytest.warns(F.MultipleFacesWarning, match="2 faces"):
        tokens = two_faces.encode_identities([refs[0]])
    only_large = dataclasses.replace(pipe, analyzer=FixedAnalyzer([large])).encode_identities([refs[0]])
    np.testing.assert_array_equal(tokens, only_large)
    with pytest.raises(F.MultipleFacesError):
        two_faces.encode_identities([refs[0]], strict=True)
    with pytest.raises(F.MultipleFacesError):
        dataclasses.replace(two_faces, strict=True).encode_identities([refs[0]])


def test_bad_arguments(pipe, refs, weights):
    with pytest.raises(ValueError, match="face_prompts has 1 entries for 2"):
        run(pipe, refs, face_prompts=["smiling"])
    with pytest.raises(ValueError, match="overlap"):
        run(pipe, refs, boxes=[[0, 0, 1, 0.6], [0, 0.4, 1, 1]])
    with pytest.raises(ValueError, match="3 boxes for 2 identities"):
        run(pipe, refs, boxes=[[0, 0, 1, 0.3], [0, 0.3, 1, 0.6], [0, 0.6, 1, 1]])
    with pytest.raises(ValueError, match="multiple of 32"):
        run(pipe, refs, height=48)
    with pytest.raises(ValueError, match="face_prompts\\[0\\] must be non-empty"):
        run(pipe, refs[:1], face_prompts=[""])
    with pytest.raises(ValueError, match="needs the IMR|need the IMR"):
        dataclasses.replace(pipe, imr=None).encode_identities(refs[:1], ["smiling"])
    with pytest.raises(ValueError, match="references .* or id_tokens"):
        pipe("a cat", steps=STEPS, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="id_tokens must be"):
        pipe("a cat", id_tokens=np.zeros((1, 3, ENC.dim)), steps=STEPS, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="boost_steps"):
        run(pipe, refs, boost_steps=-1)
    with pytest.raises(ValueError, match="128-d face embeddings but the analyzer"):
        small = FixedAnalyzer([])
        small.embedding_dim = 512
        DynamicIDPipeline.from_weights(pipe.sd, weights, pipe.image_encoder, pipe.image_encoder_params, small)
    other_unet = dataclasses.replace(weights.saa_unet_config, block_out_channels=(32, 64, 128))
    zeros = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, np.float32),
                                   nn.meta.unbox(S.abstract_saa_params(other_unet, weights.saa)))
    bad = dataclasses.replace(weights, saa_unet_config=other_unet, saa_params=zeros)
    with pytest.raises(Exception, match="wrong shape.*mid_block|mid_block.*wrong shape|wrong shape"):
        DynamicIDPipeline.from_weights(pipe.sd, bad, pipe.image_encoder, pipe.image_encoder_params,
                                       FixedAnalyzer([]))


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def test_cli_dynamicid_end_to_end(tiny_sd_dir, dynamicid_dir, clip_dir, refs, two_id, tmp_path, capsys):
    from infer import generate

    paths = []
    for i, ref in enumerate(refs):
        paths += ["--reference", str(tmp_path / f"ref{i}.png")]
        Image.fromarray(ref).save(paths[-1])
    out, gates_png = tmp_path / "out.png", tmp_path / "gates.png"
    assert generate.main(["--model", tiny_sd_dir, "--dynamicid", dynamicid_dir, "--image-encoder", clip_dir,
                          "--analyzer", "dlib", *paths, "--boxes", ";".join(",".join(map(str, b)) for b in TWO_BOXES),
                          "--prompt", PROMPT, "--height", str(SIZE), "--width", str(SIZE), "--steps", str(STEPS),
                          "--seed", "5", "--save-gates", str(gates_png), "--out", str(out)]) == 0
    image = np.asarray(Image.open(out).convert("RGB"))
    np.testing.assert_array_equal(image, two_id[0][0])  # the same generation as the library call
    assert np.asarray(Image.open(gates_png)).shape[:2] == (18 + 6 * (SIZE + 2), 110 + 2 * (SIZE + 2))
    err = capsys.readouterr().err
    assert "identities" in err and "it/s" in err
    with pytest.raises(SystemExit):
        generate.main(["--model", tiny_sd_dir, "--dynamicid", dynamicid_dir, *paths, "--face-prompt", "smiling",
                       "--prompt", "a", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):
        generate.main(["--model", tiny_sd_dir, "--dynamicid", dynamicid_dir, *paths, "--boxes", "0,0,1",
                       "--prompt", "a", "--out", str(tmp_path / "x.png")])
    # options of one method are rejected when another one runs (parsed only: nothing is loaded)
    for argv, message in ((["--ref", paths[1]], "--reference needs an identity method"),
                          (["--method", "dynamicid", *paths], "--method dynamicid needs --dynamicid"),
                          (["--id-scale", "0.5"], "--id-scale needs an identity method"),
                          (["--method", "infinite-id", "--dynamicid", dynamicid_dir], "belong to DynamicID"),
                          (["--infinite-id-weights", "w"], "--infinite-id-weights belong to --method infinite-id")):
        with pytest.raises(SystemExit):
            generate.main(["--model", tiny_sd_dir, "--prompt", "a", "--out", str(tmp_path / "x.png"), *argv])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert generate.parse_layout("2,1") == [2.0, 1.0] and generate.parse_layout("grid") == "grid"
