"""DynamicID and Infinite-ID *sampling* on the tiny SDXL (tests/tiny_sdxl.py): the pipelines load an SDXL folder,
put their strategies on every SDXL attention layer, reproduce plain ``StableDiffusionXL`` exactly at
``id_scale=0``, change the image at ``id_scale=1``, refuse weights of the other backbone, and run from
``infer.generate``.

Method weights are random, in the folder formats the trainers export (``save_dynamicid``, ``save_infinite_id``),
drawn on the host from the abstract shapes (no init to compile). The face analyzer is a test double: one face per
image, its embedding a fixed projection of the image's colours. 64×64 images, 2 DDIM steps, guidance on; the CLI
runs reuse the programs the pipelines compiled."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dynamicid_jax.faces import Face, register_backend
from dynamicid_jax.methods import id_encoder as ide
from dynamicid_jax.methods import imr
from dynamicid_jax.methods import infinite_id as iid
from dynamicid_jax.methods.infinite_id_weights import save_infinite_id
from dynamicid_jax.methods import saa as S
from dynamicid_jax.models import clip
from dynamicid_jax.models import unet as U

SIZE, STEPS, GUIDANCE = 64, 2, 5.0
EMBED_DIM = 16  # the tiny-sdxl ID encoders' face-embedding width
PROMPT = "a photo of a person"
# the ArcFace template (112 px) scaled onto a 64-px reference image (Infinite-ID aligns the face with it)
KPS = np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]]) / 112


class ColourFaces:
    """One face per image at fixed relative positions; the embedding is a fixed projection of the image's colours
    (so different references give different identities); 106 landmarks for the IMR's raster."""

    embedding_dim, num_landmarks = EMBED_DIM, 106

    def __init__(self):
        self.proj = np.random.default_rng(9).standard_normal((48, EMBED_DIM))
        self.landmarks = np.random.default_rng(10).uniform(0.2, 0.8, (106, 2))

    def analyze(self, image):
        image = np.asarray(image)
        h, w = image.shape[:2]
        small = np.asarray([image[i * h // 4:(i + 1) * h // 4, j * w // 4:(j + 1) * w // 4].mean((0, 1))
                            for i in range(4) for j in range(4)]).reshape(-1) / 255
        e = (small - 0.5) @ self.proj
        scale = np.array([w, h])
        return [Face(bbox=[0.1 * w, 0.1 * h, 0.9 * w, 0.95 * h], kps=KPS * scale, landmarks=self.landmarks * scale,
                     embedding=e / np.linalg.norm(e), pose=[0, 0, 0], det_score=0.99)]


register_backend("sdxl-test-faces", lambda **_: ColourFaces(), overwrite=True)


def _random_like(abstract, seed, scale=0.2):
    """Host-side random arrays of an abstract tree's shapes; norm scales near 1, BatchNorm statistics (0, 1)."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = getattr(path[-1], "key", None)
        if name == "var":
            return np.ones(a.shape, np.float32)
        if name == "mean":
            return np.zeros(a.shape, np.float32)
        noise = (rng.standard_normal(a.shape) * scale).astype(np.float32)
        return noise + 1.0 if name == "scale" else noise

    return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(abstract))


def _references():
    return [np.random.default_rng(s).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for s in (1, 2)]


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory, torch):
    from tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl_methods")))[0]


@pytest.fixture(scope="module")
def xl_unet_config(xl_dir):
    from dynamicid_jax.weights import keymap as km

    return U.UNetConfig.from_dict(km.read_config(os.path.join(xl_dir, "unet")))


@pytest.fixture(scope="module")
def xl(dynamicid):
    """The StableDiffusionXL the DynamicID pipeline loaded from the folder (loaded once for the whole module)."""
    return dynamicid.sd


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    module = clip.CLIPVisionModelWithProjection(clip.vision_config("tiny"))
    size = module.config.image_size
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
    return clip.save_image_encoder(tmp_path_factory.mktemp("vision") / "clip", module, _random_like(abstract, 3, 0.05))


def _dynamicid_weights(unet_config, variant, with_imr=True):
    """Random DynamicID weights for ``unet_config`` (LoRA up = 0, as a fresh stage 1), with IMR + KeyPointEncoder
    unless ``with_imr=False``."""
    from dynamicid_jax.pipelines.dynamicid import DynamicIDWeights

    enc = ide.id_encoder_config(variant)
    icfg, kcfg = imr.imr_config(variant), imr.keypoint_encoder_config(variant)
    strategy = S.SAA(lora_rank=4)
    saa = jax.tree_util.tree_map_with_path(  # LoRA up-projections zero: the UNet is the base until trained
        lambda p, x: np.zeros_like(x) if any(getattr(k, "key", None) == "up" for k in p) else x,
        _random_like(S.abstract_saa_params(unet_config, strategy), 2))
    weights = DynamicIDWeights(enc, _random_like(ide.abstract_params(ide.IDEncoder(enc)), 1), strategy,
                               unet_config, saa)
    if with_imr:
        weights.imr_config, weights.imr_params = icfg, _random_like(imr.abstract_params(imr.IMR(icfg)), 4)
        weights.keypoint_encoder_config = kcfg
        weights.keypoint_encoder_variables = _random_like(
            imr.keypoint_abstract_variables(imr.KeyPointEncoder(kcfg)), 5)
    return weights


@pytest.fixture(scope="module")
def dynamicid_dir(xl_unet_config, vision_dir, tmp_path_factory):
    """An SDXL DynamicID folder as ``train.export_dynamicid`` writes it (with ``image_encoder/``)."""
    import shutil

    from dynamicid_jax.pipelines.dynamicid import save_dynamicid

    folder = save_dynamicid(tmp_path_factory.mktemp("dynamicid_sdxl") / "weights",
                            _dynamicid_weights(xl_unet_config, "tiny-sdxl"))
    shutil.copytree(vision_dir, os.path.join(folder, "image_encoder"))
    return folder


@pytest.fixture(scope="module")
def dynamicid(xl_dir, dynamicid_dir):
    """From the SDXL folder: the backbone is read from it."""
    from dynamicid_jax.pipelines.dynamicid import DynamicIDPipeline

    return DynamicIDPipeline.from_pretrained(xl_dir, dynamicid_dir, analyzer="sdxl-test-faces", scheduler="ddim")


@pytest.fixture(scope="module")
def plain(xl):
    """Plain SDXL text-to-image of PROMPT (seed 3, no negative prompt: zero unconditional embeddings)."""
    return xl.generate(PROMPT, height=SIZE, width=SIZE, steps=STEPS, guidance_scale=GUIDANCE, seed=3)


def _module_path(name: str) -> str:
    """diffusers layer name → our module path (down_blocks.1.attentions.0.… → down_blocks_1/attentions_0/…)."""
    parts, out = name.split("."), []
    for i, p in enumerate(parts):
        if p.isdigit():
            out[-1] += f"_{p}"
        else:
            out.append(p)
    return "/".join(out)


@pytest.mark.slow  # kept out of the default run for its 10-minute budget (make test-slow runs it)
def test_dynamicid_on_sdxl(dynamicid, xl, plain):
    """DynamicID from an SDXL folder + an SDXL DynamicID folder (as the trainers export it): SAA's LoRA on every
    SDXL attention layer and its ID branch on every cross-attention, one gate map per cross-attention; id_scale=0
    equals plain StableDiffusionXL bit for bit (same seed, guidance, zero negatives); id_scale=1 changes the image,
    and so do another reference and another micro-conditioning; an IMR face prompt edits the ID tokens (the IMR
    reads SDXL's pooled text)."""
    from dynamicid_jax.pipelines.stable_diffusion_xl import StableDiffusionXL

    assert isinstance(dynamicid.sd, StableDiffusionXL)
    names = U.attention_layer_names(xl.unet.config)
    flat = ["/".join(p) for p in traverse_util.flatten_dict(dynamicid.unet_params)]
    assert {p.split("/to_q_lora/")[0] for p in flat if "/to_q_lora/" in p} == {_module_path(n) for n in names}
    cross = {_module_path(n) for n in names if n.endswith("attn2")}
    assert {p.split("/to_k_ip/")[0] for p in flat if "/to_k_ip/" in p} == cross

    refs = _references()
    kw = dict(steps=STEPS, guidance_scale=GUIDANCE, seed=3, height=SIZE, width=SIZE)
    off = dynamicid(PROMPT, refs[:1], id_scale=0.0, **kw)
    np.testing.assert_array_equal(off, plain)
    on, gates = dynamicid(PROMPT, refs[:1], return_gates=True, **kw)
    assert on.shape == (1, SIZE, SIZE, 3) and np.std(on) > 1.0
    assert np.abs(on.astype(int) - plain).max() > 0, "the identity must change the image"
    assert set(gates.maps) == cross and all(np.isfinite(m).all() for m in gates.maps.values())
    other = dynamicid(PROMPT, refs[1:], **kw)
    assert np.abs(other.astype(int) - on).max() > 0, "another reference, another image"
    cropped = dynamicid(PROMPT, refs[:1], crops_coords_top_left=(16, 16), **kw)
    assert np.abs(cropped.astype(int) - on).max() > 0, "the micro-conditioning reaches the UNet"
    assert dynamicid.num_compiled == 1, "one program: id_scale, references and micro-conditioning are traced"

    plain_tokens = dynamicid.encode_identities(refs[:1])
    edited = dynamicid.encode_identities(refs[:1], face_prompts=["a very surprised expression"])
    assert edited.shape == plain_tokens.shape == (1, 4, xl.unet.config.cross_attention_dim)
    assert float(jnp.abs(edited - plain_tokens).max()) > 1e-4


def test_wrong_backbone_weights_refused(xl, xl_dir, dynamicid_dir, vision_dir, tmp_path):
    """An SD1.x DynamicID folder on the SDXL base (and SDXL weights on an SD1.x base) is a one-line error naming
    both backbones, raised before the base is loaded; the manifest records the backbone and a manifest that
    contradicts its SAA weights is refused. SD1.x Infinite-ID weights on SDXL: one line naming the widths and the
    base's backbone."""
    from dynamicid_jax.pipelines.dynamicid import DynamicIDPipeline, load_dynamicid, save_dynamicid
    from dynamicid_jax.weights.keymap import WeightLoadError

    with open(os.path.join(dynamicid_dir, "dynamicid.json")) as f:
        assert json.load(f)["backbone"] == "SDXL"
    sd15 = save_dynamicid(tmp_path / "sd15", _dynamicid_weights(U.unet_config("tiny"), "tiny", with_imr=False))
    with pytest.raises(ValueError) as err:
        DynamicIDPipeline.from_pretrained(xl_dir, sd15, analyzer="sdxl-test-faces", clip_vision_path=vision_dir)
    message = str(err.value)
    assert "\n" not in message and "for SD1.x" in message and "is SDXL" in message and sd15 in message

    sd15_base = tmp_path / "sd15_base"  # an SD1.x folder: the refusal comes before anything of it is read
    sd15_base.mkdir()
    (sd15_base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match=r"for SDXL, but the base model .* is SD1\.x"):
        DynamicIDPipeline.from_pretrained(str(sd15_base), dynamicid_dir, analyzer="sdxl-test-faces")

    manifest = os.path.join(sd15, "dynamicid.json")
    with open(manifest) as f:
        meta = json.load(f)
    with open(manifest, "w") as f:
        json.dump({**meta, "backbone": "SDXL"}, f)
    with pytest.raises(WeightLoadError, match="says backbone 'SDXL'.*SD1.x UNet"):
        load_dynamicid(sd15)

    from dynamicid_jax.pipelines.infinite_id import InfiniteIDPipeline

    tiny_sd = U.unet_config("tiny")
    cfg = iid.infinite_id_encoder_config("tiny")
    save_infinite_id(str(tmp_path / "iid_sd15"), cfg, _random_like(iid.abstract_encoder_params(cfg), 6),
                     _random_like(iid.abstract_id_params(tiny_sd), 7), tiny_sd)
    with pytest.raises(WeightLoadError) as err:
        InfiniteIDPipeline.from_pretrained(xl, str(tmp_path / "iid_sd15"), vision_dir)
    message = str(err.value)
    assert "\n" not in message and "width 32" in message and "has 64" in message and "base model is SDXL" in message


@pytest.fixture(scope="module")
def infinite_id_dir(xl, tmp_path_factory):
    cfg = iid.infinite_id_encoder_config("tiny-sdxl")
    folder = str(tmp_path_factory.mktemp("infinite_id_sdxl") / "weights")
    save_infinite_id(folder, cfg, _random_like(iid.abstract_encoder_params(cfg), 6),
                     _random_like(iid.abstract_id_params(xl.unet.config), 7, 0.3), xl.unet.config)
    return folder


def _same_image(a, b, what):
    """Equal up to float32 rounding. The two streams make the UNet batch 4 rows where plain SDXL has 2, and XLA's
    kernels for another batch size may round differently: a few pixels move by one level (measured: 4 of
    12,288 values), as in the SD1.5 Infinite-ID test."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) < 2e-3, f"{what}: max diff {diff.max()}, {np.mean(diff > 0):.2%}"


@pytest.mark.slow  # the default run keeps DynamicID on SDXL; make test-slow runs both methods
def test_infinite_id_on_sdxl(xl, infinite_id_dir, vision_dir, plain):
    """Infinite-ID on the loaded SDXL: the text stream is plain StableDiffusionXL, and so is the ID stream with λ = 0
    and mixing off (up to float32 rounding: :func:`_same_image`); with λ = 1 and mixed attention + AdaIN-mean on
    every SDXL self-attention the ID stream differs clearly, and the text stream stays the same."""
    from dynamicid_jax.pipelines.infinite_id import InfiniteIDPipeline

    pipe = InfiniteIDPipeline.from_pretrained(xl, infinite_id_dir, vision_dir, face_analyzer="sdxl-test-faces",
                                              mix_layers=None)
    kw = dict(steps=STEPS, guidance_scale=GUIDANCE, seed=3, height=SIZE, width=SIZE, return_text_stream=True)
    ref = _references()[:1]
    off, text = pipe(PROMPT, ref, id_scale=0.0, mix_steps=(0, 0), **kw)
    _same_image(text, plain, "text stream")
    _same_image(off, plain, "ID stream at λ = 0 without mixing")
    on, text_on = pipe(PROMPT, ref, **kw)
    np.testing.assert_array_equal(text_on, text)
    assert np.std(on) > 1.0 and np.abs(on.astype(int) - plain).max() > 8
    assert pipe.num_compiled == 1


@pytest.mark.slow
def test_cli_methods_on_sdxl(xl, xl_dir, dynamicid_dir, infinite_id_dir, vision_dir, tmp_path, monkeypatch):
    """``infer.generate --model SDXL --method dynamicid|infinite-id`` picks the SDXL backbone from the folder and
    writes the PNGs (gate overlay and text stream too). To keep the suite fast the folder's loader hands out the
    already loaded ``xl`` (recording that it was asked for the folder); loading from the folder itself is the
    ``dynamicid`` fixture's, and the samplers are those the pipeline tests compiled."""
    from PIL import Image

    from dynamicid_jax.file_io import save_png
    from dynamicid_jax.pipelines.stable_diffusion_xl import StableDiffusionXL
    from infer import generate

    loads = []

    def loaded_xl(cls, path, **kwargs):
        loads.append(path)
        return xl

    monkeypatch.setattr(StableDiffusionXL, "from_pretrained", classmethod(loaded_xl))

    ref = save_png(_references()[0], str(tmp_path / "ref.png"))
    common = ["--model", xl_dir, "--prompt", PROMPT, "--reference", ref, "--analyzer", "sdxl-test-faces",
              "--height", str(SIZE), "--width", str(SIZE), "--steps", str(STEPS), "--seed", "3"]
    out = tmp_path / "dynamicid.png"
    assert generate.main(common + ["--method", "dynamicid", "--dynamicid", dynamicid_dir, "--out", str(out),
                                   "--save-gates", str(tmp_path / "gates.png")]) == 0
    assert Image.open(out).size == (SIZE, SIZE) and (tmp_path / "gates.png").is_file()
    out = tmp_path / "infinite_id.png"
    assert generate.main(common + ["--method", "infinite-id", "--infinite-id-weights", infinite_id_dir,
                                   "--image-encoder", vision_dir, "--out", str(out),
                                   "--save-text-stream", str(tmp_path / "text.png")]) == 0
    assert Image.open(out).size == Image.open(tmp_path / "text.png").size == (SIZE, SIZE)
    assert loads == [xl_dir, xl_dir]


@pytest.mark.slow
def test_stage1_trained_on_sdxl_loads_and_samples(xl_dir, xl, tmp_path):
    """Two stage-1 steps on the tiny SDXL, its export through ``train.export_dynamicid`` (with the random CLIP it
    trained with), loaded into the SDXL DynamicID pipeline: finite, non-constant images, and the identity changes
    them (id_scale=1 differs from 0)."""
    from dynamicid_jax import sharding as sh
    from dynamicid_jax.pipelines.dynamicid import DynamicIDPipeline
    from train import loop, runs, stage1
    from train.config import load_config
    from train.export_dynamicid import export_dynamicid

    cfg = load_config(None, ["model.image_encoder=random:tiny", "model.id_encoder_variant=tiny-sdxl",
                             "model.lora_rank=4", "model.dtype=float32", "train.progress_bar=false",
                             "checkpoint.every=0", "train.steps=2", f"model.base={xl_dir}"],
                      defaults=stage1.DEFAULTS)
    s1 = stage1.Stage1(cfg, base=runs.load_base(xl_dir, jnp.float32))
    mesh = sh.make_mesh(sh.MeshConfig(data=1), devices=jax.devices()[:1])
    trainer = loop.Trainer(s1.task(), cfg, str(tmp_path / "s1"), mesh=mesh)

    def batch(seed, b=2):
        rng = np.random.default_rng(seed)
        return {"ref_clip_pixels": rng.standard_normal((b, 32, 32, 3)).astype(np.float32),
                "ref_id_embedding": rng.standard_normal((b, EMBED_DIM)).astype(np.float32),
                "input_ids": np.concatenate([np.full((b, 1), 49406), rng.integers(1, 1000, (b, 5)),
                                             np.full((b, 71), 49407)], axis=1).astype(np.int32),
                "identity": np.arange(b, dtype=np.int32),
                "target_latent_moments": rng.standard_normal((b, 8, 8, 8)).astype(np.float32)}

    state = trainer.fit(iter([batch(1), batch(2)]))
    folder = export_dynamicid(s1.export(state, str(tmp_path / "s1")), None, str(tmp_path / "dynamicid"))
    pipe = DynamicIDPipeline.from_pretrained(xl, folder, analyzer="sdxl-test-faces")
    kw = dict(steps=STEPS, guidance_scale=GUIDANCE, seed=3, height=SIZE, width=SIZE)
    on = pipe(PROMPT, _references()[:1], **kw)
    off = pipe(PROMPT, _references()[:1], id_scale=0.0, **kw)
    assert on.shape == (1, SIZE, SIZE, 3) and np.std(on) > 1.0 and np.std(off) > 1.0
    assert np.abs(on.astype(int) - off).max() > 0
