"""The insightface backend on a small synthetic model pack built here with ``onnx``.

Real buffalo_l packs cannot be downloaded in tests, so each model is a tiny ONNX graph with the input / output
names and shapes that insightface's model router expects: an SCRFD-like detector (input ``[1, 3, ?, ?]``, nine
outputs: scores / boxes / keypoints at strides 8, 16, 32, two anchors per cell) that fires on bright 32×32
cells, an ArcFace-like recogniser (``[1, 3, 112, 112] → [1, 512]``, random linear map), a 106-point landmark
head (``[1, 3, 192, 192] → [1, 212]``), a 68-point 3D landmark head (``→ [1, 3309]``, giving insightface a
known pose) and a gender/age head (``[1, 3, 96, 96] → [1, 3]``).
"""
import os

import numpy as np
import pytest
from PIL import Image

insightface = pytest.importorskip("insightface")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # insightface + skimage

import dynamicid_jax.faces as F  # noqa: E402
from dynamicid_jax.faces.pose import rotation_from_pose  # noqa: E402

BUFFALO_L = ("det_10g.onnx", "w600k_r50.onnx", "2d106det.onnx", "1k3d68.onnx", "genderage.onnx")
# detector keypoints relative to the anchor, in strides (left eye, right eye, nose, left / right mouth corner)
KPS_UNIT = np.array([[-0.6, -0.5], [0.6, -0.5], [0.0, 0.1], [-0.5, 0.7], [0.5, 0.7]])
BOX_HALF = 2.5  # box half-size in strides: boxes of diagonally adjacent cells overlap enough (IoU 0.47) for NMS
POSE_3D68 = (0.0, 20.0, 0.0)  # the pose baked into the 3D landmark head


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


def make_detector(path):
    """Score = sigmoid(10·mean(cell) − 5) at stride 32 (≈0.993 on a white cell, ≈0 on black); strides 8 and 16
    never fire. Boxes: ±2.5 strides around the anchor; keypoints: fixed offsets (KPS_UNIT)."""
    nodes, inits = [], []
    for s in (8, 16, 32):
        nodes.append(helper.make_node("AveragePool", ["input.1"], [f"pool{s}"], kernel_shape=[s, s],
                                      strides=[s, s], name=f"pool{s}"))
        for kind, k in (("score", 1), ("bbox", 4), ("kps", 10)):
            w, b = np.zeros((2 * k, 3, 1, 1)), np.zeros(2 * k)
            if kind == "score":
                w[:], b[:] = (10.0 / 3, -5.0) if s == 32 else (0.0, -20.0)
            elif kind == "bbox":
                b[:] = BOX_HALF
            else:
                b[:] = np.tile(KPS_UNIT.reshape(-1), 2)
            inits += [_const(f"w_{kind}{s}", w), _const(f"b_{kind}{s}", b),
                      _const(f"shape_{kind}{s}", [-1, k], np.int64)]
            flat = f"flat_{kind}{s}" if kind == "score" else f"{kind}_{s}"
            nodes += [
                helper.make_node("Conv", [f"pool{s}", f"w_{kind}{s}", f"b_{kind}{s}"], [f"c_{kind}{s}"],
                                 name=f"conv_{kind}{s}"),
                helper.make_node("Transpose", [f"c_{kind}{s}"], [f"t_{kind}{s}"], perm=[0, 2, 3, 1],
                                 name=f"nhwc_{kind}{s}"),  # rows ordered (y, x, anchor) like SCRFD's anchors
                helper.make_node("Reshape", [f"t_{kind}{s}", f"shape_{kind}{s}"], [flat], name=f"rows_{kind}{s}"),
            ]
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [flat], [f"score_{s}"], name=f"sigmoid{s}"))
    outputs = [helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, [f"n{s}", k])
               for kind, k in (("score", 1), ("bbox", 4), ("kps", 10)) for s in (8, 16, 32)]
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])]
    _save(helper.make_graph(nodes, "scrfd_like", inputs, outputs, inits), path)


def make_head(path, size, out_dim, *, bias=None, pool=None, seed=0):
    """``[1, 3, size, size]`` → AveragePool(pool) → Flatten → Gemm → ``[1, out_dim]``: a random linear map, or
    a constant output ``bias`` when given."""
    pool = pool or size
    n_in = 3 * (size // pool) ** 2
    if bias is None:
        weight = np.random.default_rng(seed).normal(0.0, 1.0 / np.sqrt(n_in), (n_in, out_dim))
        bias = np.zeros(out_dim)
    else:
        weight = np.zeros((n_in, out_dim))
    nodes = [helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool],
                              name="pool"),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "weight", "bias"], ["output"], name="fc")]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, out_dim])],
        [_const("weight", weight), _const("bias", bias)])
    _save(graph, path)


def landmarks_106_unit():
    """106 points in the landmark head's [-1, 1] crop frame (an ellipse)."""
    angle = np.linspace(0.0, 2 * np.pi, 106, endpoint=False)
    return np.stack([0.45 * np.cos(angle), 0.55 * np.sin(angle)], axis=1)


def build_pack(root, files=BUFFALO_L):
    pack = os.path.join(root, "models", "buffalo_l")
    os.makedirs(pack, exist_ok=True)
    meanshape = insightface.data.get_object("meanshape_68.pkl").astype(np.float64)
    lmk3d = np.zeros(3309)
    lmk3d[-68 * 3:] = (0.6 * meanshape @ rotation_from_pose(*POSE_3D68).T).reshape(-1)
    makers = {
        "det_10g.onnx": lambda p: make_detector(p),
        "w600k_r50.onnx": lambda p: make_head(p, 112, 512, pool=8),
        "2d106det.onnx": lambda p: make_head(p, 192, 212, bias=landmarks_106_unit().reshape(-1)),
        "1k3d68.onnx": lambda p: make_head(p, 192, 3309, bias=lmk3d),
        "genderage.onnx": lambda p: make_head(p, 96, 3, bias=[0.2, 0.8, 0.35]),
    }
    for name in files:
        makers[name](os.path.join(pack, name))
    return pack


@pytest.fixture(scope="module")
def pack_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("insightface_root"))
    build_pack(root)
    return root


@pytest.fixture(scope="module")
def analyzer(pack_root):
    return F.get_analyzer("insightface", root=pack_root, providers=["CPUExecutionProvider"])


def face_image(cells=((7, 7),), size=512):
    """Dark, colourful background (never detected) with bright, slightly yellow 32×32 "faces" at grid cells."""
    yy, xx = np.mgrid[:size, :size]
    image = np.stack([(xx * 90 // size), (yy * 60 // size), np.full_like(xx, 40)], axis=-1).astype(np.uint8)
    for row, col in cells:
        image[row * 32:(row + 1) * 32, col * 32:(col + 1) * 32] = (255, 250, 200)
    return image


def test_pack_loads_and_analyzes(analyzer):
    assert analyzer.embedding_dim == 512 and analyzer.num_landmarks == 106
    assert sorted(analyzer.app.models) == ["detection", "landmark_2d_106", "landmark_3d_68", "recognition"]
    faces = analyzer.analyze(face_image())
    assert len(faces) == 1
    face = faces[0]
    anchor = np.array([7 * 32.0, 7 * 32.0])  # SCRFD anchors sit at the cell's top-left corner
    np.testing.assert_allclose(face.bbox, np.r_[anchor - 80, anchor + 80], atol=1e-3)
    np.testing.assert_allclose(face.kps, anchor + KPS_UNIT * 32, atol=1e-3)
    assert face.landmarks.shape == (106, 2) and face.landmarks.dtype == np.float32
    # the landmark head sees a crop of 1.5 × the box around its centre; its [-1, 1] output maps back to pixels
    centre, half = anchor, 1.5 * 160 / 2
    np.testing.assert_allclose(face.landmarks, centre + landmarks_106_unit() * half, atol=0.1)
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    assert abs(np.linalg.norm(face.embedding) - 1) < 1e-5
    np.testing.assert_allclose(face.pose, POSE_3D68, atol=0.05)  # insightface's convention == ours
    assert abs(face.det_score - 1 / (1 + np.exp(-(10 * (255 + 250 + 200 - 3 * 127.5) / 128 / 3 - 5)))) < 1e-3
    assert face.extras["landmark_3d_68"].shape == (68, 3)
    assert F.reference_face(analyzer, face_image(), strict=True).bbox.tolist() == face.bbox.tolist()


def test_all_buffalo_modules_and_bgr(pack_root):
    full = F.get_analyzer("insightface", root=pack_root, allowed_modules=None, providers=["CPUExecutionProvider"])
    assert "genderage" in full.app.models
    image = face_image()
    face = full.analyze(image)[0]
    assert face.extras["gender"] == 1 and face.extras["age"] == 35
    # the backend hands insightface BGR (what its models expect); RGB would give another embedding
    bgr_face = full.app.get(np.ascontiguousarray(image[:, :, ::-1]))[0]
    rgb_face = full.app.get(image)[0]
    np.testing.assert_allclose(face.embedding, bgr_face.normed_embedding, atol=1e-6)
    assert np.linalg.norm(face.embedding - rgb_face.normed_embedding) > 0.05


def test_two_faces_and_no_face(analyzer):
    image = face_image(cells=((4, 3), (9, 11)))
    faces = analyzer.analyze(image)
    assert len(faces) == 2
    assert np.linalg.norm(faces[0].embedding - faces[1].embedding) > 0.05  # different crops, different vectors
    with pytest.warns(F.MultipleFacesWarning):
        F.reference_face(analyzer, image)
    with pytest.raises(F.MultipleFacesError):
        F.reference_face(analyzer, image, strict=True)
    with pytest.raises(F.NoFaceError):
        F.reference_face(analyzer, face_image(cells=()))


def test_pose_from_keypoints_without_3d_head(pack_root):
    no3d = F.get_analyzer("insightface", root=pack_root, providers=["CPUExecutionProvider"],
                          allowed_modules=["detection", "recognition", "landmark_2d_106"])
    face = no3d.analyze(face_image())[0]
    np.testing.assert_allclose(face.pose, F.estimate_pose(face.kps), atol=1e-5)
    assert "landmark_3d_68" not in face.extras
    with pytest.raises(ValueError, match="landmark_2d_106"):
        F.get_analyzer("insightface", root=pack_root, allowed_modules=["detection", "recognition"])


def test_landmark_raster_matches_the_official_recipe(analyzer):
    image = face_image(cells=(), size=400)[:, :300].copy()  # not square: the raster ignores the aspect ratio
    image[150:215, 120:170] = (255, 250, 200)  # covers at least one whole 32-cell after the resize to 512²
    raster = F.landmark_raster(image, analyzer, strict=True)
    # the official recipe, written out: resize to 512², analyse (BGR), 106 landmarks / (512/96), int(), 0 < · < 96
    resized = np.asarray(Image.fromarray(image).resize((512, 512), Image.Resampling.BICUBIC))
    landmark = analyzer.app.get(np.ascontiguousarray(resized[:, :, ::-1]))[0]["landmark_2d_106"] / (512 / 96)
    expected = np.zeros([96, 96], dtype=np.uint8)
    for i in range(len(landmark)):
        if landmark[i][0] > 0 and landmark[i][1] > 0 and landmark[i][0] < 96 and landmark[i][1] < 96:
            expected[int(landmark[i][1]), int(landmark[i][0])] = 255
    expected = (expected.astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_array_equal(raster[:, :, 0], expected)
    assert raster.shape == (96, 96, 1) and 30 <= int((raster > 0).sum()) <= 106


def test_missing_pack_names_folder_and_files(tmp_path):
    root = tmp_path / "ifroot"
    with pytest.raises(FileNotFoundError) as err:
        F.get_analyzer("insightface", root=str(root))
    message = str(err.value)
    assert f"{root}/models/buffalo_l/" in message and "does not exist" in message
    for name in BUFFALO_L:
        assert name in message
    assert "unzip" in message
    build_pack(str(root), files=("det_10g.onnx",))
    with pytest.raises(FileNotFoundError, match="incomplete: missing w600k_r50.onnx, 2d106det.onnx"):
        F.get_analyzer("insightface", root=str(root))


def test_pose_estimator_on_an_independent_3d_face():
    """Our generic-face fit recovers yaw / roll of insightface's own mean 3D face (a different shape)."""
    meanshape = insightface.data.get_object("meanshape_68.pkl").astype(np.float64)
    base = F.estimate_pose((meanshape @ rotation_from_pose(0, 0, 0).T)[:, :2] * 200)
    for pose in [(0, 25, 0), (0, -30, 0), (0, 0, 20), (10, 20, -10), (-15, -15, 5)]:
        est = F.estimate_pose((meanshape @ rotation_from_pose(*pose).T)[:, :2] * 200)
        # the two shapes' frontal frames differ by ~17° of pitch (base[0]); turning about a tilted axis
        # leaks a few degrees into roll, hence the looser roll bound
        assert abs(est[1] - pose[1]) < 5 and abs(est[2] - pose[2]) < 8, (pose, est)
        assert abs((est[0] - base[0]) - pose[0]) < 5, (pose, est, base)


def test_align_matches_insightface_norm_crop():
    from insightface.utils import face_align

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(image).resize((300, 300)))  # smooth texture
    kps = np.array([[110, 120], [175, 118], [140, 160], [115, 200], [170, 198]], dtype=np.float64)
    ours = F.align_face(image, kps).astype(np.int16)
    ref = face_align.norm_crop(np.ascontiguousarray(image[:, :, ::-1]), kps)[:, :, ::-1].astype(np.int16)
    diff = np.abs(ours - ref)
    assert diff.max() <= 2 and diff.mean() < 0.8  # bilinear rounding differs between PIL and OpenCV
