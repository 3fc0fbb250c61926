"""A little tree of face images with per-image JSON sidecars, and an analyzer that reads the sidecars — the input
of the shard-building and loader tests (tests/test_data_shards.py) and of the bad-shard cases (tests/test_bad_inputs.py).

Five people (alice, bob, carol, dave, erin), PNG and JPEG files of different sizes, a caption file or a JSON
caption on some, an image without a face, an unreadable one, one with two faces, a hidden folder and a stray file at
the top; ``SidecarAnalyzer`` answers each image's faces from its sidecar, with one embedding per person plus a little
per-call noise."""
import hashlib
import json
import os

import numpy as np
from PIL import Image

from dynamicid_jax import faces as F

EMB_DIM = 16


def _unit(seed, dim=EMB_DIM):
    v = np.random.default_rng(seed).normal(size=dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


class SidecarAnalyzer:
    """Reads ``faces`` (boxes, poses) from the JSON next to the image path — as a synthetic backend would."""

    name = "sidecar-fake"
    embedding_dim = EMB_DIM
    num_landmarks = 68

    def __init__(self, fail_on=None):
        self.calls = []
        self.fail_on = fail_on

    def analyze(self, image):
        assert isinstance(image, str), "build_shards hands analyzers the image path"
        self.calls.append(os.path.basename(image))
        if self.fail_on is not None and os.path.basename(image) == self.fail_on:
            raise RuntimeError("analyzer crashed")
        with open(os.path.splitext(image)[0] + ".json") as f:
            meta = json.load(f)
        out = []
        for face in meta.get("faces", []):
            x0, y0, x1, y1 = face["bbox"]
            w, h = x1 - x0, y1 - y0
            kps = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]]) * [w, h] + [x0, y0]
            lmk = np.stack(np.meshgrid(np.linspace(x0, x1, 17), np.linspace(y0, y1, 4)), -1).reshape(-1, 2)
            ident = int(hashlib.md5(face["who"].encode()).hexdigest()[:6], 16)
            emb = _unit(ident) + 0.05 * _unit(len(self.calls) + 1000)
            out.append(F.Face(bbox=face["bbox"], kps=kps, landmarks=lmk,
                              embedding=emb / np.linalg.norm(emb), pose=face["pose"], det_score=0.9))
        return out


def _face(who, pose=(0, 0, 0), bbox=(8, 10, 40, 50)):
    return {"who": who, "pose": list(pose), "bbox": list(bbox)}


# name → (identity, size (w, h), format, sidecar, caption)
IMAGES = [
    ("alice", "a0.png", (48, 64), {"faces": [_face("alice")], "face_prompt": "in a sad expression, in front view"},
     None),
    ("alice", "a1.jpg", (64, 48), {"faces": [_face("alice", (0, 30, 0))]}, "alice on a beach\n"),
    ("alice", "a2.png", (40, 40), {"faces": [_face("alice", (15, 0, 0), (4, 4, 36, 36))], "expression": "surprised",
                                   "caption": "alice, json caption"}, None),
    ("bob", "b0.png", (48, 64), {"faces": [_face("bob", (0, -20, 0))]}, "bob smiling"),
    ("bob", "b1.png", (48, 64), {"faces": [_face("bob")]}, None),
    ("bob", "b2.png", (48, 64), {"faces": []}, None),  # no face → skipped
    ("bob", "broken.jpg", None, {"faces": [_face("bob")]}, None),  # unreadable → skipped
    ("carol", "c0.png", (56, 56), {"faces": [_face("x", bbox=(0, 0, 10, 10)), _face("carol", bbox=(10, 10, 50, 50))]},
     "carol"),
    ("carol", "c1.png", (56, 56), {"faces": [_face("carol", (-12, 5, 0))]}, None),
    ("dave", "d0.png", (48, 48), {"faces": []}, None),  # dave has no usable image
    ("erin", "e0.png", (32, 48), {"faces": [_face("erin", bbox=(4, 4, 28, 40))]}, None),
]


def write_tree(root):
    rng = np.random.default_rng(0)
    for ident, name, size, meta, caption in IMAGES:
        folder = root / ident
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if size is None:
            path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
        else:
            w, h = size
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        (folder / (os.path.splitext(name)[0] + ".json")).write_text(json.dumps(meta))
        if caption is not None:
            (folder / (os.path.splitext(name)[0] + ".txt")).write_text(caption)
    (root / ".hidden").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / ".hidden" / "x.png")
    (root / "README.md").write_text("not an identity")
    return root
