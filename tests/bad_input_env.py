"""The world of the bad-input tests (tests/test_bad_inputs.py, tests/test_bad_inputs_library.py): a data folder
with a user's notes, a copy of a model folder, good, huge, truncated and fake images, a pickle, someone else's folder
and good face shards — everything a bad-input case points at and must leave byte-for-byte unchanged."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import struct
import zlib

import numpy as np
from PIL import Image


def png_header(width: int, height: int) -> bytes:
    """A small PNG file whose header claims ``width × height`` (a few bytes of pixel data: opening reads the size,
    decoding would need the full image)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def tree_digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
    return out


def make_env(root: pathlib.Path, tiny_sd_dir: str) -> dict[str, str]:
    """The data folder every case must leave untouched (under ``root``), and the paths the cases point at."""
    data = root / "data"
    data.mkdir()
    (data / "notes.txt").write_text("a user's notes: must survive every command\n")
    user_model = data / "my-sd-copy"
    shutil.copytree(tiny_sd_dir, user_model)
    (user_model / "NOTES.md").write_text("my fine-tuning notes\n")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(data / "face.png")
    (data / "huge.png").write_bytes(png_header(12000, 12000))
    (data / "bomb.png").write_bytes(png_header(14000, 14000))
    good = (data / "face.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "not_an_image.jpg").write_text("hello")
    (data / "a_file").write_text("x")
    (data / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")
    (data / "not_sd").mkdir()
    (data / "not_sd" / "README.txt").write_text("a folder of someone else's\n")  # an empty one may be written
    (data / "list.yaml").write_text("- a\n- b\n")
    (data / "scheduler_karras.json").write_text(json.dumps({
        "_class_name": "DPMSolverSinglestepScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "use_karras_sigmas": True}))
    shards = data / "shards"
    write_shards(str(shards))
    out = root / "out"
    out.mkdir()
    return {"root": str(root), "data": str(data), "out": str(out), "model": tiny_sd_dir, "shards": str(shards)}


def write_shards(folder: str) -> None:
    """The face shards of test_data_shards' little image tree (4 shards, 8 records), built with its analyzer."""
    import tempfile

    from data_pipelines import build_shards as B
    from face_tree import SidecarAnalyzer, write_tree

    with tempfile.TemporaryDirectory() as tree:
        write_tree(pathlib.Path(tree))
        B.build_shards(tree, folder, SidecarAnalyzer(), images_per_shard=3, progress=False,
                       default_caption="a photo of a person")


def broken_shards(env, name: str, how: str) -> str:
    """A copy of the good shards (outside the protected data folder) with its second shard file damaged."""
    dst = os.path.join(env["root"], "broken", name)
    if not os.path.exists(dst):
        shutil.copytree(env["shards"], dst)
        path = os.path.join(dst, "faces-00001-of-00004.array_record")
        data = open(path, "rb").read()
        if how == "empty":
            data = b""
        elif how == "truncated":
            data = data[: len(data) // 2]
        elif how == "junk":  # a few KiB of junk over the first record's chunk
            data = data[:64] + np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes() + \
                data[3064:]
        elif how == "manifest":
            with open(os.path.join(dst, "manifest.json"), "w") as f:
                f.write("{ not json")
        elif how == "missing":
            os.remove(path)
        if how not in ("manifest", "missing"):
            with open(path, "wb") as f:
                f.write(data)
    return dst
