"""SynthFace generator: CLI + tree layout, determinism, record schema, landmarks on the drawn features, pose
conventions, expressions, the rasteriser. No training here (see test_synthface_models.py)."""
import dataclasses
import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

import dynamicid_jax.faces as F
import synthface as sf
from synthface import __main__ as cli
from synthface import face_model
from synthface.face_model import Pose2D, face_layout
from synthface.raster import Canvas, Window, polygon_coverage
from synthface.render import render_portrait
from synthface.world import (
    SceneAttributes,
    rng_for,
    sample_identity,
    sample_scene,
    sample_variation,
)

SEED = 7


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthface"))
    index = cli.main(["--out", out, "--identities", "2", "--seed", str(SEED), "--heldout", "2", "--scenes", "2",
                      "--pairs", "3", "--validation", "1", "--workers", "1", "--quiet"])
    return out, index


def _png_bytes(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- layout

def test_training_pairs(tree):
    """Pairs: two distinct training identities side by side (64×128), a group caption that names each shirt by
    side and never who they are, boxes in left / right halves, and ``load_pairs`` in index order."""
    out, index = tree
    images, records = sf.load_pairs(out)
    assert images.shape == (3, 64, 128, 3) and images.dtype == np.uint8
    for rec in records:
        faces = rec["faces"]
        assert rec["split"] == "pairs" and len(faces) == 2
        assert {f["split"] for f in faces} == {"train"} and faces[0]["identity"] != faces[1]["identity"]
        assert rec["caption"] == sf.group_caption(rec["background"], [f["clothing"] for f in faces])
        assert f"the person on the left wears {'an' if faces[0]['clothing'][0] in 'aeiou' else 'a'} " \
               f"{faces[0]['clothing']} shirt" in rec["caption"]
        assert not any(f["identity"] in rec["caption"] for f in faces)
        assert faces[0]["bbox"][2] <= 64 + 4 and faces[1]["bbox"][0] >= 64 - 4
    again, _ = sf.load_pairs(out)
    assert np.array_equal(images, again)
    empty = str(out) + "_nopairs"
    sf.generate(empty, 2, seed=SEED, heldout=0, scenes=0, progress=False)
    none, recs = sf.load_pairs(empty)
    assert none.shape == (0, 64, 128, 3) and recs == []
    with pytest.raises(ValueError, match="pairs need at least 2"):
        sf.generate(empty + "2", 1, seed=SEED, heldout=0, scenes=0, pairs=2, progress=False)


def test_tree_layout_and_index(tree):
    out, index = tree
    assert index == sf.load_index(out)
    assert index["splits"] == {"train": ["id00000", "id00001"], "heldout": ["ho00000", "ho00001"],
                               "validation": ["va00000"]}
    assert index["images_per_identity"] == 35 and index["image_size"] == 64
    for split, names in index["splits"].items():
        for name in names:
            files = sorted(os.listdir(os.path.join(out, split, name)))
            stems = {f"{e}_{p}" for e in sf.EXPRESSIONS for p in sf.POSES}
            assert files == sorted(f"{s}.{ext}" for s in stems for ext in ("json", "png", "txt"))
    assert index["scenes"] == ["scenes/scene00000.png", "scenes/scene00001.png"]
    assert index["pairs"] == [f"pairs/pair0000{k}.png" for k in range(3)]
    for s in index["scenes"]:
        for ext in (".png", ".txt", ".json"):
            assert os.path.isfile(os.path.join(out, os.path.splitext(s)[0] + ext))


def test_files_are_deterministic_and_independent_of_the_identity_count(tree):
    out, _ = tree
    # identity 1 re-rendered on its own (as if --identities were 1000) gives the same bytes as the files
    for stem, image, record in sf.render_identity(SEED, "train", 1)[::7]:
        base = os.path.join(out, "train", "id00001", stem)
        assert _png_bytes(image) == _png_bytes(np.asarray(Image.open(base + ".png")))
        assert json.loads(json.dumps(record)) == sf.read_record(base + ".png")
    other = sf.render_identity(SEED + 1, "train", 1)[0][1]
    assert not np.array_equal(other, np.asarray(Image.open(os.path.join(out, "train/id00001/neutral_left.png"))))
    # held-out and validation identities are different people from training ones with the same index
    assert sample_identity(SEED, "train", 0) != sample_identity(SEED, "heldout", 0)
    assert len({sample_identity(SEED, split, 0) for split in ("train", "heldout", "validation")}) == 3
    # a world without validation identities has no such split (older indexes and the base's fingerprint unchanged)
    assert "validation" not in sf.generate(str(out) + "_noval", 1, seed=SEED, heldout=0, scenes=0,
                                           progress=False)["splits"]


def test_worker_processes_write_the_same_files(tree):
    """``workers=2`` (what ``make demo`` and ``make base`` render with) writes byte for byte the files and index of
    ``workers=1``."""
    out, index = tree
    again = str(out) + "_two_workers"
    assert sf.generate(again, 2, seed=SEED, heldout=2, scenes=2, pairs=3, validation=1, workers=2,
                       progress=False) == index

    def files(root):
        found = {}
        for folder, _, names in os.walk(root):
            for name in names:
                with open(os.path.join(folder, name), "rb") as f:
                    found[os.path.relpath(os.path.join(folder, name), root)] = f.read()
        return found

    first, second = files(out), files(again)
    assert len(first) > 100 and first == second


def test_record_schema(tree):
    out, _ = tree
    for path in sf.list_images(out, "train") + sf.list_images(out, "heldout"):
        r = sf.read_record(path)
        assert r["schema"] == sf.SCHEMA and r["size"] == [64, 64]
        bbox, kps, lmk = np.array(r["bbox"]), np.array(r["kps"]), np.array(r["landmarks"])
        assert kps.shape == (5, 2) and lmk.shape == (68, 2) and len(r["landmarks_visible"]) == 68
        assert -0.5 <= bbox[0] < bbox[2] <= 63.5 and -0.5 <= bbox[1] < bbox[3] <= 63.5
        assert np.all((kps >= bbox[:2]) & (kps <= bbox[2:]))
        np.testing.assert_allclose(kps, F.kps_from_68(lmk), atol=2e-4)
        pitch, yaw, roll = r["pose"]
        assert pitch == 0 and abs(yaw - sf.POSE_YAW[r["pose_name"]]) <= 3.0 and abs(roll) <= 4.0
        assert r["image"] == f"{r['expression']}_{r['pose_name']}.png"
        assert r["face_prompt"] == F.auto_face_prompt(r["pose"], sf.PROMPT_EXPRESSION[r["expression"]])
        scene = r["scene"]
        assert scene["background"] in sf.BACKGROUNDS and scene["clothing"] in sf.CLOTHING
        assert scene["background"] in r["caption"] and f"{scene['clothing']} shirt" in r["caption"]
        assert {"left": "on the left", "center": "in the center", "right": "on the right"}[
            scene["placement"]] in r["caption"]
        with open(os.path.splitext(path)[0] + ".txt", encoding="utf-8") as f:
            assert f.read().strip() == r["caption"]
        assert sf.Identity.from_dict(r["identity_params"]) == sample_identity(
            SEED, r["split"], int(r["identity"][2:]))


def test_scenes_have_disjoint_boxes_of_heldout_people(tree):
    out, index = tree
    for s in index["scenes"]:
        r = sf.read_record(os.path.join(out, s))
        image = np.asarray(Image.open(os.path.join(out, s)))
        n = len(r["faces"])
        assert n in (2, 3) and list(image.shape) == r["size"] + [3] and r["size"] == [64, 64 * n]
        assert len({f["identity"] for f in r["faces"]}) == n
        for k, f in enumerate(r["faces"]):
            assert f["split"] == "heldout" and f["identity"] in index["splits"]["heldout"]
            assert f["box"] == pytest.approx([0.0, k / n, 1.0, (k + 1) / n])
            x0, x1 = f["box"][1] * 64 * n, f["box"][3] * 64 * n
            assert x0 <= np.mean(np.array(f["kps"])[:, 0]) <= x1  # the face sits in its own strip
            assert f"{f['clothing']} shirt" in r["caption"]
            assert os.path.isfile(os.path.join(out, f["reference"]))


# ---------------------------------------------------------------------------------------- landmarks on pixels

def _scene_and_variation(k):
    rng = rng_for(3, "train", 0, k)
    return sample_scene(rng), sample_variation(rng)


def _render(ident, expression, pose, k, **changes):
    scene, variation = _scene_and_variation(k)
    return render_portrait(dataclasses.replace(ident, **changes), expression, pose, scene, variation, 64)


def _bilinear(values, points):
    """``values`` ``[H, W]`` interpolated at sub-pixel ``points`` ``[N, 2]`` (x, y; pixel centres at integers)."""
    p = np.asarray(points, np.float64)
    x0, y0 = np.floor(p[:, 0]).astype(int), np.floor(p[:, 1]).astype(int)
    fx, fy = p[:, 0] - x0, p[:, 1] - y0
    v = np.asarray(values, np.float64)
    return ((1 - fx) * (1 - fy) * v[y0, x0] + fx * (1 - fy) * v[y0, x0 + 1] + (1 - fx) * fy * v[y0 + 1, x0]
            + fx * fy * v[y0 + 1, x0 + 1])


@pytest.mark.parametrize("index", [0, 1, 2])
def test_landmarks_land_on_the_rendered_features(index):
    """Re-rendering with one colour changed (iris / lips / brows+hair / skin) changes the pixels under the
    corresponding landmarks (image values interpolated at the landmark's sub-pixel position): they lie on the
    features drawn in that colour (eye centres: iris or pupil, wherever the lids leave the iris centre uncovered;
    schema 3's bold angry, disgusted and sad lids cover it)."""
    ident = sample_identity(11, "train", index)
    open_eyes = []
    for k, (expression, pose) in enumerate((e, p) for e in sf.EXPRESSIONS for p in sf.POSES):
        if k % 3 != index:  # a third of the grid per parameter, all of it over the three
            continue
        base, r = _render(ident, expression, pose, k)
        lmk, kps = np.array(r["landmarks"]), np.array(r["kps"])
        visible = np.array(r["landmarks_visible"])

        def changed(points, expression=expression, pose=pose, k=k, base=base, **changes):
            other, _ = _render(ident, expression, pose, k, **changes)
            return _bilinear(np.abs(other.astype(int) - base.astype(int)).max(-1), points) > 20

        pupil = _bilinear(base.max(-1), kps[:2]) < 60  # the pupil (drawn near-black) sits mid-iris
        # schema 3 draws expressions 1.8× strong: an upper lid lowered below 0.4 of its neutral opening (every bold
        # angry, disgusted and sad face) reaches the iris centre, so the eye centre then lies on the lid
        strength = face_model.EXPRESSION_STRENGTH * _scene_and_variation(k)[1].intensity  # as _render draws it
        is_open = np.full(2, face_model._scaled(face_model.EXPRESSION_SHAPES[expression], strength).upper_lid >= 0.4)
        open_eyes += list(is_open)
        assert (changed(kps[:2], eyes=(0.0, 1.0, 0.0)) | pupil | ~is_open).all(), (expression, pose, "eye centres")
        lips = np.stack([(lmk[51] + lmk[62]) / 2, (lmk[57] + lmk[66]) / 2])
        assert changed(lips, lips=(0.0, 1.0, 1.0)).all(), (expression, pose, "lips")
        assert changed(lmk[[19, 24]], hair=(0.0, 1.0, 0.0)).all(), (expression, pose, "brows")
        jaw = lmk[:17][visible[:17]]
        assert changed(jaw, skin=(0.2, 0.9, 0.2)).mean() >= 0.9, (expression, pose, "jaw")
    assert np.mean(open_eyes) > 0.4, np.mean(open_eyes)  # neutral, happy, surprised, afraid: 4 of 7 expressions


def test_pose_convention_matches_the_library_pose_estimator():
    """yaw > 0 = facing the image's right, roll > 0 = clockwise: dynamicid_jax.faces.estimate_pose on the 68
    rendered landmarks agrees in sign (the generic 3D face differs from SynthFace's, so not in size)."""
    ident = sample_identity(5, "train", 3)
    for yaw in (-50.0, -25.0, 25.0, 50.0):
        lay = face_layout(ident, "neutral", Pose2D(yaw=yaw, roll=0.0, cx=32, cy=28, scale=15))
        est = F.estimate_pose(lay.landmarks)
        assert np.sign(est[1]) == np.sign(yaw) and abs(est[1]) > 10, (yaw, est)
    for roll in (-10.0, 10.0):
        lay = face_layout(ident, "neutral", Pose2D(yaw=0.0, roll=roll, cx=32, cy=28, scale=15))
        assert abs(F.estimate_pose(lay.landmarks)[2] - roll) < 3.0
    # turning moves the nose tip towards the facing side, more than the eyes (2.5D depth)
    front = face_layout(ident, "neutral", Pose2D(0.0, 0.0, 32, 28, 15))
    right = face_layout(ident, "neutral", Pose2D(40.0, 0.0, 32, 28, 15))
    nose_shift = right.landmarks[30, 0] - front.landmarks[30, 0]
    eye_shift = right.kps[:2, 0].mean() - front.kps[:2, 0].mean()
    assert nose_shift > eye_shift > 0


def test_expressions_change_the_geometry_the_same_way_for_everyone():
    pose = Pose2D(0.0, 0.0, 32, 28, 15)
    for i in range(6):
        ident = sample_identity(2, "train", i)
        lay = {e: face_layout(ident, e, pose).landmarks for e in sf.EXPRESSIONS}
        opening = {e: lm[66, 1] - lm[62, 1] for e, lm in lay.items()}
        corner_lift = {e: (lm[62, 1] + lm[66, 1]) / 2 - (lm[48, 1] + lm[54, 1]) / 2 for e, lm in lay.items()}
        brow = {e: lm[[19, 24], 1].mean() for e, lm in lay.items()}
        eye_open = {e: (lm[[40, 41, 46, 47], 1] - lm[[38, 37, 43, 44], 1]).mean() for e, lm in lay.items()}
        assert opening["surprised"] > opening["afraid"] > opening["happy"] > opening["neutral"] == 0
        assert corner_lift["happy"] > 0.5 > -0.5 > corner_lift["sad"]
        assert brow["surprised"] < brow["neutral"] < brow["angry"]  # image y grows downwards
        assert eye_open["surprised"] > eye_open["neutral"] > eye_open["happy"]


def test_images_differ_across_identities_and_expressions():
    scene = SceneAttributes("gray", "blue", "center")
    var = sample_variation(rng_for(0, "train", 0, 1))
    a = [render_portrait(sample_identity(0, "train", i), "neutral", "front", scene, var)[0] for i in range(3)]
    b = [render_portrait(sample_identity(0, "train", 0), e, "front", scene, var)[0] for e in sf.EXPRESSIONS]
    for group in (a, b):
        for i in range(len(group)):
            for j in range(i):
                assert np.abs(group[i].astype(int) - group[j].astype(int)).sum() > 500


# ------------------------------------------------------------------------------------------------ raster

def test_polygon_coverage_is_area_exact_to_supersampling():
    canvas = Canvas(40, 40)
    ang = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    circle = np.stack([20.3 + 11 * np.cos(ang), 19.6 + 11 * np.sin(ang)], -1)
    poly_area = 0.5 * abs(np.dot(circle[:, 0], np.roll(circle[:, 1], 1)) - np.dot(circle[:, 1],
                                                                                  np.roll(circle[:, 0], 1)))
    assert canvas.mask(circle).sum() == pytest.approx(poly_area, rel=0.01)
    square = np.array([[2.5, 3.5], [12.5, 3.5], [12.5, 9.5], [2.5, 9.5]])  # pixel edges: exactly 10 × 6 pixels
    cov = polygon_coverage(Window(0, 40, 0, 40), square)
    assert cov.sum() == pytest.approx(60.0) and cov[4:10, 3:13].min() == 1.0 and cov[10:, :].max() == 0.0
    canvas.stroke(np.array([[5.0, 30.0], [35.0, 30.0]]), 2.0, (1.0, 1.0, 1.0))
    assert canvas.rgb[..., 0].sum() == pytest.approx(30 * 2 + math.pi, rel=0.05)  # capsule area


def test_stage0_timestep_weights_keep_or_drop_the_noisiest_steps_as_named():
    """Stage 0's loss weights have mean 1 for every kind; Min-SNR-γ on v-prediction gives the noisiest timesteps
    almost no weight, ``snr_cap`` keeps them at the weight of the middle ones and lowers only the nearly clean
    timesteps (SNR > γ) by γ / SNR, ``signal_floor`` is ᾱ_t floored at its floor (clean end ≈ uniform's)."""
    import types

    from dynamicid_jax.schedulers import SD15_SCHEDULER_CONFIG, load_scheduler
    from dynamicid_jax.schedulers.noise_schedule import alphas_cumprod
    from synthface.stage0_phases import timestep_weights

    scheduler = load_scheduler({**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    ac = alphas_cumprod(scheduler.config, False).astype(np.float64)
    snr = ac / (1 - ac)
    weights = {k: timestep_weights(scheduler, k, 5.0, 0.25) for k in ("uniform", "min_snr", "snr_cap", "signal_floor")}
    for kind, w in weights.items():
        assert w.shape == (1000,) and abs(float(w.mean()) - 1.0) < 1e-5, kind
    assert np.all(weights["uniform"] == 1.0)
    cap, msnr = weights["snr_cap"], weights["min_snr"]
    noisy, clean = snr < 5.0, snr > 5.0
    assert np.allclose(cap[noisy], cap[noisy][0]) and np.allclose(cap[clean] / cap[noisy][0], 5.0 / snr[clean],
                                                                  rtol=1e-4)
    assert msnr[-1] < 0.05 * msnr.max() and cap[-1] == cap.max()
    floor = weights["signal_floor"]
    assert np.allclose(floor / floor.max(), np.maximum(ac, 0.25) / np.maximum(ac, 0.25).max(), rtol=1e-5)
    assert floor[-1] == floor.min() and floor[-1] / floor[0] == pytest.approx(0.25 / ac[0], rel=1e-5)
    with pytest.raises(ValueError, match="'uniform', 'min_snr', 'snr_cap' or 'signal_floor'"):
        timestep_weights(types.SimpleNamespace(config=scheduler.config), "other")
    with pytest.raises(ValueError, match="weight_floor must be a number in"):
        timestep_weights(scheduler, "signal_floor", 5.0, 1.5)
