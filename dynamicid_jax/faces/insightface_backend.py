"""insightface backend: ``FaceAnalysis(name="buffalo_l")`` as the official DynamicID pipeline uses it.

Needs the ``insightface`` and ``onnxruntime`` packages (``[faces]`` extra) and a model pack on disk: for
``buffalo_l`` the folder ``{root}/models/buffalo_l/`` with ``det_10g.onnx`` (SCRFD detector), ``w600k_r50.onnx``
(512-d ArcFace), ``2d106det.onnx`` (106 landmarks), ``1k3d68.onnx`` (68 3D landmarks → pose) and
``genderage.onnx``. Nothing is downloaded: a missing pack is an error that says where to put it.

Differences from the official code (deliberate): the image is converted RGB → BGR before every call (the
official pipeline passed RGB to the embedding call and BGR only to the landmark call), and no face is an error
at the caller (:func:`~dynamicid_jax.faces.reference_face`) instead of a silent zero embedding.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Sequence

import numpy as np

from .analyzer import Face, missing_extra_error
from dynamicid_jax.file_io import ImageLike, load_rgb
from .pose import estimate_pose

__all__ = ["InsightFaceAnalyzer", "PACK_FILES", "DEFAULT_MODULES", "check_model_pack"]

#: the files of the packs we know (others are accepted as long as the required tasks load)
PACK_FILES = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx", "2d106det.onnx", "1k3d68.onnx", "genderage.onnx"),
}
_PACK_REQUIRED = {"buffalo_l": ("det_10g.onnx", "w600k_r50.onnx", "2d106det.onnx")}
#: insightface task names we load by default (genderage is not needed by DynamicID)
DEFAULT_MODULES = ("detection", "recognition", "landmark_2d_106", "landmark_3d_68")
_REQUIRED = ("detection", "recognition", "landmark_2d_106")
_HOW_TO_GET = ("download the pack once on a machine with internet access (e.g. run "
               "insightface.app.FaceAnalysis(name={name!r}) there, or fetch {name}.zip from the insightface "
               "model-zoo release on GitHub) and unzip it so the .onnx files sit directly in that folder")


def check_model_pack(name: str, root: str | os.PathLike) -> str:
    """The pack folder ``{root}/models/{name}``; raises ``FileNotFoundError`` (with what to do) if it is missing."""
    pack_dir = os.path.join(os.path.expanduser(os.fspath(root)), "models", name)
    expected = PACK_FILES.get(name)
    present = sorted(os.path.basename(p) for p in glob.glob(os.path.join(pack_dir, "*.onnx")))
    if not present:
        files = f" ({', '.join(expected)})" if expected else ""
        state = "is empty" if os.path.isdir(pack_dir) else "does not exist"
        raise FileNotFoundError(f"insightface model pack {name!r} not found: the folder {pack_dir}/ {state}; it "
                                f"must hold the pack's .onnx files{files}. To get it, "
                                + _HOW_TO_GET.format(name=name))
    required = _PACK_REQUIRED.get(name, ())
    unknown = [f for f in present if f not in (expected or ())]
    needed = [f for f in required if f not in present]
    if needed and not unknown:  # an incomplete copy of a known pack (renamed files are routed by model shape)
        raise FileNotFoundError(f"insightface model pack {name!r} in {pack_dir}/ is incomplete: missing "
                                f"{', '.join(needed)} (expected {', '.join(expected)}). To get it, "
                                + _HOW_TO_GET.format(name=name))
    return pack_dir


class InsightFaceAnalyzer:
    """Face analysis with an insightface model pack (see the module docstring).

    Args:
      name: the pack name (``buffalo_l`` for DynamicID's checkpoints).
      root: insightface's root folder; the pack lives in ``{root}/models/{name}/``.
      allowed_modules: insightface task names to load; detection, recognition and landmark_2d_106 are required.
        Without landmark_3d_68 the pose is estimated from the 5 keypoints (:func:`~.pose.estimate_pose`).
      det_size: detector input size ``(width, height)``; the official pipeline uses (512, 512).
      det_thresh: detector score threshold.
      providers: onnxruntime execution providers (default: insightface's choice, e.g. CUDA then CPU).
      ctx_id: insightface's device index (``-1`` forces CPU).
    """

    name = "insightface"
    num_landmarks = 106

    def __init__(self, name: str = "buffalo_l", root: str | os.PathLike = "~/.insightface",
                 allowed_modules: Sequence[str] | None = DEFAULT_MODULES, det_size: tuple[int, int] = (512, 512),
                 det_thresh: float = 0.5, providers: Sequence[Any] | None = None, ctx_id: int = 0):
        try:
            from insightface.app import FaceAnalysis
        except ImportError as err:
            raise missing_extra_error("insightface", "insightface", err) from err
        if allowed_modules is not None:
            allowed_modules = list(allowed_modules)
            absent = [m for m in _REQUIRED if m not in allowed_modules]
            if absent:
                raise ValueError(f"allowed_modules must include {', '.join(absent)} (got {allowed_modules})")
        root = os.path.expanduser(os.fspath(root))
        self.pack_dir = check_model_pack(name, root)
        kwargs: dict[str, Any] = {}
        if providers is not None:
            kwargs["providers"] = list(providers)
        try:
            app = FaceAnalysis(name=name, root=root, allowed_modules=allowed_modules, **kwargs)
        except AssertionError as err:  # insightface asserts that a detector was found
            raise ValueError(f"insightface could not find a face detector among the .onnx files in "
                             f"{self.pack_dir}/") from err
        loaded = set(app.models)
        missing = [m for m in _REQUIRED if m not in loaded]
        if missing:
            raise ValueError(f"insightface pack in {self.pack_dir}/ lacks the {', '.join(missing)} model(s); "
                             f"loaded: {', '.join(sorted(loaded))}")
        app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=tuple(det_size))
        self._app = app
        self.pack = name
        self.det_size = tuple(det_size)
        shape = getattr(app.models["recognition"], "output_shape", None)
        self.embedding_dim = int(shape[1]) if shape is not None and isinstance(shape[1], int) else 512

    def __repr__(self) -> str:
        return (f"InsightFaceAnalyzer(pack={self.pack!r}, modules={sorted(self._app.models)}, "
                f"det_size={self.det_size})")

    @property
    def app(self):
        """The underlying ``insightface.app.FaceAnalysis``."""
        return self._app

    def analyze(self, image: ImageLike) -> list[Face]:
        """All faces in ``image`` (RGB array, path or PIL image), in insightface's order (best score first)."""
        rgb = load_rgb(image)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        faces = []
        for f in self._app.get(bgr):
            emb = f.normed_embedding
            if emb is None or not np.all(np.isfinite(emb)):
                continue  # no usable identity vector (e.g. a zero embedding): not a face we can use
            kps = np.asarray(f.kps, dtype=np.float32)
            pose = f.pose if f.pose is not None else estimate_pose(kps)
            extras = {k: f[k] for k in ("gender", "age", "landmark_3d_68") if f.get(k) is not None}
            faces.append(Face(bbox=f.bbox, kps=kps, landmarks=f.landmark_2d_106, embedding=emb,
                              pose=pose, det_score=f.det_score, extras=extras))
        return faces
