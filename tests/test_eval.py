"""The evaluation harness (docs/method.md §9) on real data: the scores of *real* SynthFace images (own-identity
FaceSim, placement on rendered two-person scenes with their known boxes, attribute and expression accuracy = the
classifiers' own), CLIP-T against transformers, and both suites end to end (``python -m infer.eval``) on untrained
tiny pipelines: every file written, every number finite, clear errors. The metric functions on constructed inputs
are in test_eval_metrics.py.

A small SynthFace world (4 training + 2 held-out identities) and tiny face models trained on it for a few dozen
steps are built once per session; the input and the evaluation recogniser are the same tiny model here (the demo
trains two different ones) — these tests check the harness, not the models' quality."""
import json
import math
import os

import jax
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

import synthface as sf
from dynamicid_jax.eval import metrics as M
from synthface.evaluation import suite as S
from synthface.evaluation.classifiers import ClassifierConfig, train_classifier
from synthface.evaluation.scorer import SynthFaceScorer
from synthface.faces.detector import DetectorConfig, LandmarkerConfig, train_detector, train_landmarker
from synthface.faces.recognizer import RecognizerConfig, train_recognizer
from infer import eval as cli

TINY = dict(widths=(8, 16, 32))
EMB = 32


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval_world"))
    sf.generate(out, identities=4, seed=3, heldout=2, scenes=2, validation=2, progress=False)
    images, records = sf.load_split(out, "train")
    return {"dir": out, "images": images, "records": records}


def _arr(records, key):
    return np.array([r[key] for r in records], np.float64)


@pytest.fixture(scope="session")
def models_dir(world, tmp_path_factory):
    """Tiny face models in the ``train_models`` folder layout (recogniser = evaluation recogniser here)."""
    images, recs = world["images"], world["records"]
    folder = tmp_path_factory.mktemp("eval_models")
    labels = np.array([int(r["identity"][2:]) for r in recs])
    rec = train_recognizer(images, _arr(recs, "kps"), labels, RecognizerConfig(embed_dim=EMB, **TINY), steps=50,
                           batch_size=48, progress=False)
    rec.save(folder / "recognizer")
    rec.save(folder / "eval_recognizer")
    boxes = _arr(recs, "bbox")
    order = np.random.default_rng(0).permutation(len(images)).reshape(-1, 2)
    canvases = np.concatenate([images[order[:, 0]], images[order[:, 1]]], axis=2)
    pair_boxes = [np.stack([boxes[a], boxes[b] + [64, 0, 64, 0]]) for a, b in order]
    train_detector(canvases, pair_boxes, DetectorConfig(widths=(8, 16, 32, 32), head_width=32), steps=70,
                   batch_size=16, progress=False).save(folder / "detector")
    train_landmarker(images, boxes, _arr(recs, "landmarks"), _arr(recs, "pose"),
                     LandmarkerConfig(crop_size=32, hidden=64, **TINY), steps=40, batch_size=48,
                     progress=False).save(folder / "landmarker")
    face = {"expression": sf.EXPRESSIONS, "pose": sf.POSES}
    face_labels = {k: np.array([list(v).index(r[k if k == "expression" else "pose_name"]) for r in recs])
                   for k, v in face.items()}
    train_classifier(images, face_labels, ClassifierConfig(heads=tuple(face.items()), crop_size=32, hidden=64, **TINY),
                     boxes, steps=60, batch_size=48, progress=False).save(folder / "face_classifier")
    scene = {"background": tuple(sf.BACKGROUNDS), "clothing": tuple(sf.CLOTHING), "placement": sf.PLACEMENTS}
    scene_labels = {k: np.array([list(v).index(r["scene"][k]) for r in recs]) for k, v in scene.items()}
    train_classifier(images, scene_labels, ClassifierConfig(heads=tuple(scene.items()), input="region", crop_size=24,
                                                            hidden=64, **TINY),
                     steps=60, batch_size=48, progress=False).save(folder / "scene_classifier")
    return str(folder)


@pytest.fixture(scope="session")
def scorer(models_dir):
    return SynthFaceScorer.from_models_dir(models_dir)


class SidecarScorer(SynthFaceScorer):
    """The evaluation models, but faces from the renderer's exact records instead of the detector."""

    def __init__(self, base, faces_by_image):
        super().__init__(base.recognizer, base.detector, base.landmarker, base.face_classifier, base.scene_classifier)
        self.faces_by_image = faces_by_image  # image bytes → list of (bbox, kps)

    def detect(self, images):
        out = []
        for im in images:
            faces = self.faces_by_image[np.asarray(im).tobytes()]
            boxes = np.array([f[0] for f in faces], np.float32)
            emb = self.recognizer.embed([im] * len(faces), np.array([f[1] for f in faces]))
            out.append(M.FaceDetections(boxes, emb, np.ones(len(faces), np.float32)))
        return out


# ------------------------------------------------------------------------------------- real SynthFace images
def test_facesim_of_real_images_separates_identities(world, scorer):
    images, recs = world["images"], world["records"]
    ids = np.array([r["identity"] for r in recs])
    is_ref = np.array([r["image"] == "neutral_front.png" for r in recs])
    emb = scorer.recognizer.embed(images, _arr(recs, "kps"))  # exact keypoints
    b = M.identity_baselines(emb[is_ref], ids[is_ref], emb[~is_ref], ids[~is_ref])
    print(f"exact faces: same {b['same_identity']:.3f}, different {b['different_identity']:.3f}")
    assert b["same_identity"] > b["different_identity"] + 0.3
    # the detection path (what generated images get) finds the faces and keeps the separation
    probe = [i for i in range(0, len(images), 2) if not is_ref[i]]
    dets = scorer.detect([images[i] for i in probe])
    found = np.array([len(d) > 0 for d in dets])
    refs = M.reference_embeddings(scorer, list(images[is_ref]))
    ref_ids = list(ids[is_ref])
    sims = np.stack([M.cosine_matrix(d.embeddings[np.argmax(d.scores)][None], refs)[0] for d in dets if len(d)])
    own = np.array([ref_ids.index(ids[i]) for i, f in zip(probe, found) if f])
    same = sims[np.arange(len(own)), own]
    other = (sims.sum(1) - same) / (len(refs) - 1)
    print(f"detected faces: {found.mean():.2f} found, same {same.mean():.3f}, different {other.mean():.3f}")
    assert found.mean() > 0.8 and same.mean() > other.mean() + 0.2


def test_validation_identities_are_scored_like_the_held_out_ones(world, scorer, tmp_path):
    """Protocol.split = "validation": the validation identities are the references and the real-image baselines
    are theirs; a world without them (or another split) is a one-line error before any model is loaded."""
    from synthface.evaluation.baselines import synthface_baselines

    index = sf.load_index(world["dir"])
    names = index["splits"]["validation"]
    assert names == ["va00000", "va00001"] and not set(names) & set(index["splits"]["heldout"])
    paths = [os.path.join(world["dir"], "validation", n, "neutral_front.png") for n in names]
    refs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    kps = [np.asarray(sf.read_record(p)["kps"], np.float64) for p in paths]  # as the suite embeds references
    b = synthface_baselines(world["dir"], scorer, names, M.reference_embeddings(scorer, refs, paths, keypoints=kps),
                            split="validation")
    assert b["identities"] == names and b["images"] == 70 and b["different_pairs"] == 1
    assert b["same_identity"] > b["different_identity"]
    bare = tmp_path / "no_validation"
    bare.mkdir()
    (bare / "synthface.json").write_text(json.dumps({**index, "splits": {k: v for k, v in index["splits"].items()
                                                                           if k != "validation"}}))
    with pytest.raises(ValueError, match="has no validation identities.*--validation N"):
        S.run_synthface(str(bare), "no-models", "no-sd", protocol=S.Protocol(split="validation"))
    with pytest.raises(ValueError, match="Protocol.split must be one of heldout, validation"):
        S.Protocol(split="train")


def _scene_faces(record):
    return [(f["bbox"], f["kps"]) for f in record["faces"]]


def test_placement_on_rendered_scenes_with_known_boxes(world, scorer):
    pool = [("train", i) for i in range(4)]
    scenes = [sf.render_scene(3, k, pool) for k in range(8)]
    refs = {}
    for r in world["records"]:
        if r["image"] == "neutral_front.png":
            refs[r["identity"]] = world["images"][world["records"].index(r)]
    sidecar = SidecarScorer(scorer, {im.tobytes(): _scene_faces(rec) for im, rec in scenes})
    results = {"exact": [], "swapped": [], "detected": []}
    for image, rec in scenes:
        names = [f["identity"] for f in rec["faces"]]
        ref_emb = M.reference_embeddings(scorer, [refs[n] for n in names])
        boxes = np.array([f["box"] for f in rec["faces"]])
        (det,) = sidecar.detect([image])
        match = M.match_faces(det, ref_emb)
        results["exact"].extend(M.placed(match, det, boxes, image.shape[:2]))
        results["swapped"].extend(M.placed(match, det, np.roll(boxes, 1, axis=0), image.shape[:2]))
        (found,) = scorer.detect([image])
        results["detected"].extend(M.placed(M.match_faces(found, ref_emb), found, boxes, image.shape[:2]))
    rates = {k: float(np.mean(v)) for k, v in results.items()}
    print(f"placement on {len(scenes)} rendered scenes: {rates}")
    assert rates["exact"] >= 0.9  # every identity recognised inside its own strip
    assert rates["swapped"] <= 1 - rates["exact"]  # boxes rotated among the people: placed only if misidentified
    assert rates["detected"] >= 0.6  # the tiny detector's path


def test_score_outputs_reproduces_the_classifiers_on_real_images(world, scorer):
    """Real images fed as "generated" outputs through :func:`score_outputs`, with exact faces: the attribute /
    expression / pose accuracies equal the classifiers' own on those images, FaceSim the plain cosine."""
    images, recs = world["images"], world["records"]
    ident = "id00001"
    sel = [i for i, r in enumerate(recs) if r["identity"] == ident and r["image"] != "neutral_front.png"][:12]
    ref_i = next(i for i, r in enumerate(recs) if r["identity"] == ident and r["image"] == "neutral_front.png")
    sidecar = SidecarScorer(scorer, {images[i].tobytes(): [(recs[i]["bbox"], recs[i]["kps"])] for i in sel})
    ref = M.reference_embeddings(scorer, [images[ref_i]])
    outputs = []
    for a, b in zip(sel[0::2], sel[1::2]):
        pair = np.stack([images[a], images[b]])
        outputs.append((S.Request("single", (0,), ("p", "q"), 0, 64, 64,
                                  attributes=(recs[a]["scene"], recs[b]["scene"])), pair))
        outputs.append((S.Request("edit", (0,), ("p", "p"), 0, 64, 64, face_prompt="x",
                                  expression=recs[a]["expression"], pose=recs[a]["pose_name"]), pair[:1]))
    res = S.score_outputs(outputs, sidecar, ref)
    single = [images[i] for i in sel]
    scene_acc = scorer.scene_classifier.accuracy(single, {k: [recs[i]["scene"][k] for i in sel]
                                                          for k in ("background", "clothing", "placement")})
    assert res["single"]["attributes"] == pytest.approx(scene_acc)
    assert res["single"]["attribute_accuracy"] == pytest.approx(np.mean(list(scene_acc.values())))
    edited = sel[0::2]
    face_acc = scorer.face_classifier.accuracy([images[i] for i in edited],
                                               {"expression": [recs[i]["expression"] for i in edited],
                                                "pose": [recs[i]["pose_name"] for i in edited]},
                                               _arr([recs[i] for i in edited], "bbox"))
    assert res["edit"]["expression_accuracy"] == pytest.approx(face_acc["expression"])
    assert res["edit"]["pose_accuracy"] == pytest.approx(face_acc["pose"])
    emb = scorer.recognizer.embed(single, _arr([recs[i] for i in sel], "kps"))
    assert res["single"]["facesim"] == pytest.approx(float((emb @ ref[0]).mean()), abs=1e-5)
    assert res["single"]["detection_rate"] == 1.0 and res["single"]["images"] == len(sel)
    print(f"real images as outputs: {json.dumps(res, default=float)[:400]}")


# --------------------------------------------------------------------------------------------- the suites
def _random_tree(abstract, seed, scale=0.05):
    """Untrained weights from shapes alone: normal × scale, LayerNorm scales 1, biases / BN means 0, BN vars 1."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, np.float32)
        return (rng.standard_normal(leaf.shape) * scale).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract))


def make_small_sd(folder: str) -> str:
    """A diffusers SD folder with untrained weights, as small as the pipelines allow (compiles fast): UNet of 2
    blocks × 1 layer, cross-attention 32, VAE factor 4 (64 px → 16² latents), a 1-layer text encoder."""
    import jax.numpy as jnp

    from dynamicid_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from dynamicid_jax.models.unet import UNet2DConditionModel, UNetConfig
    from dynamicid_jax.models.unet import abstract_params as unet_abstract
    from dynamicid_jax.models.vae import AutoencoderKL, VAEConfig
    from dynamicid_jax.models.vae import abstract_params as vae_abstract
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion
    from dynamicid_jax.schedulers import SD15_SCHEDULER_CONFIG, load_scheduler
    from dynamicid_jax.tokenizer import load_tokenizer

    unet = UNet2DConditionModel(UNetConfig(
        sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4).validate())
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8,
                                  sample_size=64).validate())
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, projection_dim=32))
    text_abstract = jax.eval_shape(text.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"]
    params = {"unet": _random_tree(unet_abstract(unet), 0), "vae": _random_tree(vae_abstract(vae), 1),
              "text_encoder": _random_tree(text_abstract, 2)}
    sd = StableDiffusion(unet, vae, text, load_tokenizer(None), load_scheduler(SD15_SCHEDULER_CONFIG, kind="ddim"),
                         params)
    return sd.save_pretrained(folder)


@pytest.fixture(scope="session")
def method_weights(tmp_path_factory):
    """An untrained small SD, DynamicID (+ its CLIP vision tower) and Infinite-ID for 32-d face embeddings."""
    from dynamicid_jax.methods import id_encoder as ide
    from dynamicid_jax.methods import imr, saa
    from dynamicid_jax.methods import infinite_id as iid
    from dynamicid_jax.methods.infinite_id_weights import save_infinite_id
    from dynamicid_jax.models.clip import CLIPVisionModelWithProjection, save_image_encoder, vision_config
    from dynamicid_jax.models.unet import UNetConfig
    from dynamicid_jax.pipelines.dynamicid import DynamicIDWeights, save_dynamicid
    from dynamicid_jax.weights import keymap as km

    root = tmp_path_factory.mktemp("eval_methods")
    sd_dir = make_small_sd(str(root / "sd"))
    ucfg = UNetConfig.from_dict(km.read_config(km.find_component(sd_dir, "unet")))
    vcfg = vision_config("tiny")
    vision = CLIPVisionModelWithProjection(vcfg)
    vparams = _random_tree(jax.eval_shape(vision.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
                           ["params"], 5, 0.2)
    enc = ide.id_encoder_config("tiny", id_embed_dim=EMB, clip_dim=vcfg.hidden_size)
    icfg, kcfg = imr.imr_config("tiny"), imr.keypoint_encoder_config("tiny")
    strategy = saa.SAA(lora_rank=4)
    weights = DynamicIDWeights(enc, _random_tree(ide.abstract_params(ide.IDEncoder(enc)), 1), strategy, ucfg,
                               saa.init_saa_params(ucfg, jax.random.key(2), strategy), icfg,
                               _random_tree(imr.abstract_params(imr.IMR(icfg)), 3), kcfg,
                               _random_tree(imr.keypoint_abstract_variables(imr.KeyPointEncoder(kcfg)), 4))
    did = save_dynamicid(root / "dynamicid", weights)
    save_image_encoder(os.path.join(did, "image_encoder"), vision, vparams)
    ecfg = iid.infinite_id_encoder_config("tiny", id_embed_dim=EMB, clip_dim=vcfg.hidden_size)
    iid_dir = str(root / "infinite_id")
    save_infinite_id(iid_dir, ecfg, _random_tree(iid.abstract_encoder_params(ecfg), 6),
                     _random_tree(iid.abstract_id_params(ucfg), 7, 0.3), ucfg)
    save_image_encoder(os.path.join(iid_dir, "image_encoder"), vision, vparams)
    return {"sd": sd_dir, "dynamicid": did, "infinite_id": iid_dir}


def _finite_numbers(obj, path="") -> list[str]:
    """Paths of numbers in ``obj`` that are not finite (None is allowed only under ``allowed`` keys)."""
    bad = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad += _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        bad.append(path)
    return bad


@pytest.mark.slow  # the quick demo (tests/test_demo.py) runs the same evaluation through run_eval
def test_synthface_cli_end_to_end_on_untrained_pipelines(world, models_dir, method_weights, tmp_path, capsys):
    w = method_weights
    out = tmp_path / "eval"
    assert cli.main(["--suite", "synthface", "--data", world["dir"], "--models", models_dir, "--sd", w["sd"],
                     "--dynamicid", w["dynamicid"], "--infinite-id", w["infinite_id"], "--quick", "--out",
                     str(out)]) == 0
    printed = capsys.readouterr().out
    for method in S.METHODS:
        for kind in ("single", "multi", "edit"):
            if method not in S.Protocol.quick().multi_methods and kind == "multi":
                assert not (out / f"{method}_{kind}.png").exists()  # the quick protocol spares the base its pairs
                continue
            image = np.asarray(Image.open(out / f"{method}_{kind}.png"))
            assert image.ndim == 3 and image.shape[0] >= 128, f"{method}_{kind}.png"
    results = json.loads((out / "metrics.json").read_text())
    assert sorted(results["methods"]) == sorted(S.METHODS)
    assert not _finite_numbers(results)  # JSON has no NaN / inf (non-finite values would be null)
    p = results["protocol"]
    # 2 held-out identities: 2 × 2 single, pairs (0, 1) and (1, 0) × 2; edit_images = 2 is one batch, so one
    # identity × 3 expressions × 2 edits and its 2 controls
    assert p["images"] == {"single": 4, "multi": 4, "edit": 6, "control": 2} and p["references"] == ["ho00000",
                                                                                                     "ho00001"]
    for method, m in results["methods"].items():
        for key in (("single", "facesim"), ("single", "detection_rate"), ("multi", "facesim_mean"),
                    ("multi", "facesim_min"), ("multi", "placement"), ("edit", "expression_accuracy"),
                    ("edit", "facesim_drop"), ("attribute_accuracy",)):
            if key[0] == "multi" and method not in S.Protocol.quick().multi_methods:
                assert "multi" not in m, method
                continue
            v = m
            for k in key:
                v = v[k]
            assert isinstance(v, float) and -1.0 <= v <= 1.0, (method, key, v)
        assert "multi" not in m or m["multi"]["facesim_min"] <= m["multi"]["facesim_mean"] + 1e-9
        assert m["edit"]["facesim_drop"] == pytest.approx(m["edit"]["facesim_unedited"] - m["edit"]["facesim"])
    b = results["baselines"]
    assert b["same_identity"] > b["different_identity"] and b["images"] == 70 and "scene_placement" in b
    assert b["different_pairs"] == 1 and b["same_pairs"] == 68  # 2 identities: one pair; 34 renders each
    assert [t["target"] for t in results["targets"]] == ["single-ID identity", "two identities in one image",
                                                         "IMR edits", "ablation w/o IMR", "ablation w/o SAA"]
    assert results["methods"]["no-imr"]["reused_from"] == "dynamicid"  # its single / multi images: DynamicID's
    assert results["methods"]["no-imr"]["single"] == results["methods"]["dynamicid"]["single"]
    assert all(t["passed"] in (True, False) for t in results["targets"])
    md = (out / "metrics.md").read_text()
    for title in ("DynamicID", "w/o SAA", "w/o IMR", "base (no ID)", "Infinite-ID", "real held-out images",
                  "## Targets", "## Protocol size"):
        assert title in md
    assert "| DynamicID |" in printed
    first = cli.run_eval(out=str(tmp_path / "again"), sd=w["sd"], dynamicid=w["dynamicid"], data=world["dir"],
                         models=models_dir, methods="dynamicid,base", quick=True)
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["methods"]["dynamicid"] == results["methods"]["dynamicid"] and "seconds" in first
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_errors_are_clear(world, models_dir, method_weights, tmp_path, capsys):
    w = method_weights
    common = ["--data", world["dir"], "--models", models_dir, "--sd", w["sd"], "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as err:
        cli.main(["--dynamicid", w["dynamicid"], "--method", "dynamicid,infinite-id", *common])
    assert err.value.code == 2 and "need the Infinite-ID weights (--infinite-id DIR)" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--dynamicid", w["dynamicid"], "--method", "dreambooth", *common])
    assert "unknown method(s) ['dreambooth']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(common)
    assert "no weights given" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="DynamicID weights .* do not exist"):
        cli.run_eval(out=str(tmp_path / "y"), sd=w["sd"], dynamicid=str(tmp_path / "missing"), data=world["dir"],
                     models=models_dir, methods="no-imr", quick=True)
    with pytest.raises(FileNotFoundError, match="lacks"):
        cli.run_eval(out=str(tmp_path / "y"), sd=w["sd"], dynamicid=w["dynamicid"], data=world["dir"],
                     models=str(tmp_path), methods="no-imr", quick=True)
    with pytest.raises(ValueError, match="needs --refs"):
        cli.run_eval(out=str(tmp_path / "y"), suite="real", sd=w["sd"], dynamicid=w["dynamicid"], prompts="p",
                     clip="c")
    with pytest.raises(ValueError, match="unknown edit expressions"):
        S.Protocol(edit_expressions=("smug",))
    assert not os.path.exists(tmp_path / "x")


# ------------------------------------------------------------------------------------------------ real suite
CROPS = ((218, 0, 451, 231), (222, 374, 499, 651))  # (y0, x0, y1, x1) of two people in insightface's t1.jpg


@pytest.fixture(scope="session")
def clip_dir(torch, tmp_path_factory):
    """A tiny random CLIPModel (text + vision towers and projections) written by transformers."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8),
                        projection_dim=16)
    folder = str(tmp_path_factory.mktemp("clip_l_tiny"))
    CLIPModel(config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


def test_clip_t_matches_transformers(clip_dir, torch):
    from transformers import CLIPModel

    scorer = M.ClipScorer.from_pretrained(clip_dir)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    prompts = ["a photo of a person in a red shirt", "two people side by side, blue background"]
    ours = scorer.score(images, prompts)
    from dynamicid_jax.models.clip import clip_preprocess
    from dynamicid_jax.tokenizer import tokenize

    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        t = model.get_text_features(input_ids=torch.tensor(tokenize(scorer.tokenizer, prompts), dtype=torch.long))
        v = model.get_image_features(pixel_values=torch.tensor(clip_preprocess(images, size=32)).permute(0, 3, 1, 2))
    t, v = getattr(t, "pooler_output", t), getattr(v, "pooler_output", v)
    expected = torch.nn.functional.cosine_similarity(t, v).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    # an image scored against the text embedding derived from itself is 1; text ↔ text of the same prompt too
    np.testing.assert_allclose(M.clip_t(scorer.image_embeds(images), scorer.image_embeds(images)), 1.0, atol=1e-6)
    np.testing.assert_allclose(M.clip_t(scorer.text_embeds(prompts), np.asarray(t)), 1.0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="CLIPModel folder"):
        M.ClipScorer.from_pretrained(os.path.join(clip_dir, "missing"))


def test_clip_t_needs_both_projections(method_weights):
    with pytest.raises(ValueError, match="not a full CLIPModel"):  # a CLIPVisionModelWithProjection folder
        M.ClipScorer.from_pretrained(os.path.join(method_weights["dynamicid"], "image_encoder"))


@pytest.mark.slow  # kept out of the default run for its 10-minute budget (make test-slow runs it)
def test_real_suite_end_to_end_on_tiny_models(method_weights, clip_dir, tmp_path):
    """--suite real with dlib (real weights), real face photos as references, an untrained DynamicID for 128-d
    dlib embeddings and the tiny CLIP: every file, CLIP-T in [-1, 1], no expression accuracy (no classifier).
    Batch 2 at 64 px: the single-ID sampler is the one the SynthFace test compiled (same small SD)."""
    import importlib.util

    import dynamicid_jax.faces as F
    from dynamicid_jax.methods import id_encoder as ide
    from dynamicid_jax.pipelines.dynamicid import load_dynamicid, save_dynamicid

    pytest.importorskip("dlib")
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the test photos ship in the insightface package, which is not installed")
    photo = F.load_rgb(os.path.join(list(spec.submodule_search_locations)[0], "data", "images", "t1.jpg"))
    refs = tmp_path / "refs"
    refs.mkdir()
    for name, (y0, x0, y1, x1) in zip(("alice", "bob"), CROPS):
        Image.fromarray(photo[y0:y1, x0:x1]).save(refs / f"{name}.png")
    (tmp_path / "prompts.txt").write_text("# comment\na photo of a person\n\na portrait, blue background\n")
    (tmp_path / "multi.txt").write_text("two people side by side\n")
    weights = load_dynamicid(method_weights["dynamicid"])  # same SAA / IMR, an ID encoder for dlib's 128-d vectors
    enc = ide.id_encoder_config("tiny", id_embed_dim=128, clip_dim=weights.id_encoder_config.clip_dim)
    weights.id_encoder_config, weights.id_encoder_params = enc, _random_tree(ide.abstract_params(ide.IDEncoder(enc)), 8)
    did = save_dynamicid(tmp_path / "dynamicid_dlib", weights)
    out = tmp_path / "real"
    assert cli.main(["--suite", "real", "--model", method_weights["sd"], "--dynamicid", str(did), "--image-encoder",
                     os.path.join(method_weights["dynamicid"], "image_encoder"), "--method", "dynamicid",
                     "--clip", clip_dir, "--analyzer", "dlib", "--input-analyzer", "dlib", "--refs", str(refs),
                     "--prompts", str(tmp_path / "prompts.txt"), "--multi-prompts", str(tmp_path / "multi.txt"),
                     "--size", "64", "--steps", "2", "--batch", "2", "--out", str(out)]) == 0
    results = json.loads((out / "metrics.json").read_text())
    assert results["protocol"]["references"] == ["alice", "bob"] and results["protocol"]["prompts"] == [
        "a photo of a person", "a portrait, blue background"]
    assert results["protocol"]["images"] == {"single": 4, "multi": 2, "edit": 14, "control": 2}
    assert results["protocol"]["multi_prompts"] == ["two people side by side"]
    # dlib is scored in its own metric: raw-descriptor Euclidean distance, same person below 0.6 — not a cosine
    assert results["baselines"]["metric"] == {"kind": "euclidean", "threshold": 0.6,
                                              "name": "Euclidean distance of raw dlib descriptors"}
    assert results["baselines"]["different_identity"] > 0.6  # the two people of the photo are different
    assert results["baselines"]["different_identity_same_person_rate"] == 0.0
    for method in ("dynamicid",):
        m = results["methods"][method]
        for kind in ("single", "multi", "edit"):
            assert -1.0 <= m[kind]["clip_t"] <= 1.0
            assert (out / f"{method}_{kind}.png").is_file()
        assert m["edit"]["expression_accuracy"] is None and 0.0 <= m["edit"]["pose_accuracy"] <= 1.0
        assert 0.0 <= m["multi"]["placement"] <= 1.0 and m["single"]["faces"] == 4
        assert "facesim" not in m["single"] and 0.0 <= m["single"]["same_person_rate"] <= 1.0
    assert not _finite_numbers(results)
    md = (out / "metrics.md").read_text()
    assert "CLIP-T" in md and "| DynamicID |" in md and "## Targets" not in md
