"""Face geometry that needs no backend: ArcFace alignment, the IMR landmark raster, the automatic face prompt.

Everything here is numpy / PIL only.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from .analyzer import FaceAnalyzer, select_reference
from dynamicid_jax.image_io import ImageLike, load_rgb

__all__ = [
    "ARCFACE_TEMPLATE", "similarity_transform", "arcface_transform", "align_face",
    "RASTER_SIZE", "RASTER_ANALYSIS_SIZE", "raster_from_landmarks", "landmark_raster", "raster_from_image",
    "raster_to_image", "EXPRESSIONS", "auto_face_prompt",
]

#: the 5-point ArcFace template for 112×112 crops (left eye, right eye, nose, left mouth, right mouth), pixels
ARCFACE_TEMPLATE = np.array([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041],
], dtype=np.float64)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) with ``dst ≈ M·[src; 1]``.

    Closed form of Umeyama (1991). Returns the ``[2, 3]`` matrix.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"similarity_transform: expected two matching [N>=2, 2] point sets, got {src.shape} "
                         f"and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = float((s_c ** 2).sum() / len(src))
    if var_s <= 1e-12:
        raise ValueError("similarity_transform: source points are coincident")
    cov = d_c.T @ s_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    fix = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        fix[1, 1] = -1.0
    rot = u @ fix @ vt
    scale = float(np.trace(np.diag(sig) @ fix)) / var_s
    trans = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, trans[:, None]])


def arcface_transform(kps: np.ndarray, size: int = 112) -> np.ndarray:
    """The ``[2, 3]`` similarity taking the 5 keypoints onto the ArcFace template of a ``size``² crop.

    ``size`` a multiple of 112 scales the template; a multiple of 128 scales it by ``size/128`` and shifts it
    right by ``8·size/128`` (the usual convention for 128-pixel crops).
    """
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2):
        raise ValueError(f"kps: expected [5, 2] keypoints, got shape {kps.shape}")
    if size % 112 == 0:
        template = ARCFACE_TEMPLATE * (size / 112.0)
    elif size % 128 == 0:
        ratio = size / 128.0
        template = ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0])
    else:
        raise ValueError(f"align size must be a multiple of 112 or 128, got {size}")
    return similarity_transform(kps, template)


def align_face(image: ImageLike, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp ``image`` so the 5 keypoints land on the ArcFace template → RGB uint8 ``[size, size, 3]``.

    Bilinear sampling, black outside the image. Pixel centres sit at integer coordinates (as for detector
    outputs), i.e. the result matches ``cv2.warpAffine`` of the same matrix.
    """
    rgb = load_rgb(image)
    m = np.vstack([arcface_transform(kps, size), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(m)
    # PIL samples at pixel centres (x + 0.5): shift the matrix so integer coordinates are centres.
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    pil_inv = shift @ inv @ np.linalg.inv(shift)
    out = Image.fromarray(rgb).transform((size, size), Image.Transform.AFFINE, data=tuple(pil_inv[:2].ravel()),
                                         resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(out, dtype=np.uint8)


# --------------------------------------------------------------------------------------------- landmark raster

RASTER_SIZE = 96
RASTER_ANALYSIS_SIZE = 512


def raster_from_landmarks(landmarks: np.ndarray, image_size: tuple[int, int] = (512, 512)) -> np.ndarray:
    """The IMR landmark raster ``[96, 96, 1]`` float32 in ``{-1, 1}`` from landmarks of an image of ``image_size``.

    ``image_size`` is ``(width, height)`` of the image the landmarks were measured on; they are first mapped to a
    512×512 frame (a no-op for the default), then divided by ``512/96`` and truncated with ``int()``; a point is
    kept only if ``0 < x < 96`` and ``0 < y < 96`` (before truncation), its pixel set to 1, and the image
    normalised as ``(v − 0.5)/0.5`` — the official recipe, so rasters match checkpoints trained on it.
    """
    pts = np.asarray(landmarks)
    if pts.ndim != 2 or pts.shape[1] < 2 or pts.shape[0] == 0:
        raise ValueError(f"landmarks: expected [N, 2] image points, got shape {pts.shape}")
    if not np.issubdtype(pts.dtype, np.floating):
        pts = pts.astype(np.float64)
    pts = pts[:, :2]
    width, height = (int(v) for v in image_size)
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive (width, height), got {image_size}")
    if (width, height) != (RASTER_ANALYSIS_SIZE, RASTER_ANALYSIS_SIZE):
        pts = pts * np.array([RASTER_ANALYSIS_SIZE / width, RASTER_ANALYSIS_SIZE / height], dtype=pts.dtype)
    pts = pts / (RASTER_ANALYSIS_SIZE / RASTER_SIZE)  # same expression (and dtype) as the official code
    raster = np.zeros((RASTER_SIZE, RASTER_SIZE), dtype=np.float32)
    for x, y in pts:
        if 0 < x < RASTER_SIZE and 0 < y < RASTER_SIZE:
            raster[int(y), int(x)] = 1.0
    return ((raster - 0.5) / 0.5)[:, :, None]


def landmark_raster(image: ImageLike, analyzer: FaceAnalyzer, strict: bool = False) -> np.ndarray:
    """The IMR landmark raster of the face in ``image`` → float32 ``[96, 96, 1]`` (NHWC without batch).

    As the official code: resize to 512×512 ignoring the aspect ratio (bicubic), analyse, rasterise the face's
    landmarks (:func:`raster_from_landmarks`). The official code used insightface's 106 points; with a 68-point
    analyzer (dlib) the raster holds those 68 points instead, which checkpoints trained on 106-point rasters
    (the released ``IMR.bin`` / ``key_point_encoder.bin``) have never seen — use the insightface backend with them.
    No face → :class:`NoFaceError`; several → the largest with a warning (``strict=True`` raises).
    """
    rgb = load_rgb(image)
    resized = np.asarray(Image.fromarray(rgb).resize((RASTER_ANALYSIS_SIZE, RASTER_ANALYSIS_SIZE),
                                                      Image.Resampling.BICUBIC))
    face = select_reference(analyzer.analyze(resized), strict, "image given for the landmark raster")
    return raster_from_landmarks(face.landmarks, (RASTER_ANALYSIS_SIZE, RASTER_ANALYSIS_SIZE))


def raster_from_image(image: ImageLike) -> np.ndarray:
    """A stored 96×96 landmark image (e.g. a target landmark PNG) → float32 ``[96, 96, 1]`` in ``[-1, 1]``.

    As the official loader: convert to grayscale, scale to ``[0, 1]``, normalise ``(v − 0.5)/0.5``.
    """
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 1 and image.dtype == np.uint8:
        gray = image[:, :, 0]
    else:
        gray = np.asarray(Image.fromarray(load_rgb(image, "landmark image")).convert("L"))
    if gray.shape != (RASTER_SIZE, RASTER_SIZE):
        raise ValueError(f"landmark image must be exactly {RASTER_SIZE}x{RASTER_SIZE}, got "
                         f"{gray.shape[1]}x{gray.shape[0]}")
    return ((gray.astype(np.float32) / 255.0 - 0.5) / 0.5)[:, :, None]


def raster_to_image(raster: np.ndarray) -> Image.Image:
    """Inverse of :func:`raster_from_image`: a ``[96, 96(, 1)]`` raster in ``[-1, 1]`` → 8-bit grayscale image."""
    arr = np.asarray(raster, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.shape != (RASTER_SIZE, RASTER_SIZE):
        raise ValueError(f"raster: expected [{RASTER_SIZE}, {RASTER_SIZE}, 1], got {np.shape(raster)}")
    return Image.fromarray(np.clip(np.round((arr * 0.5 + 0.5) * 255.0), 0, 255).astype(np.uint8), mode="L")


# ------------------------------------------------------------------------------------------ face prompts

#: the expression labels of the official emotion classifier, in its output order
EXPRESSIONS = ("happy", "surprise", "sad", "anger", "disgust", "fear", "neutral")


def auto_face_prompt(pose: Sequence[float], expression: str = "neutral") -> str:
    """The automatic source face prompt of the official pipeline, from ``(pitch, yaw[, roll])`` in degrees.

    ``"in a {expression} expression, "`` + ``"facing up, "`` if pitch > 10 / ``"facing down, "`` if pitch < −10
    + ``"in front view"`` if |yaw| < 10 else ``"in side view"``.
    """
    if expression not in EXPRESSIONS:
        raise ValueError(f"expression must be one of {', '.join(EXPRESSIONS)}; got {expression!r}")
    values = np.asarray(pose, dtype=np.float64).reshape(-1)
    if values.size not in (2, 3) or not np.all(np.isfinite(values)):
        raise ValueError(f"pose: expected finite (pitch, yaw[, roll]) in degrees, got {pose!r}")
    pitch, yaw = float(values[0]), float(values[1])
    prompt = f"in a {expression} expression, "
    if pitch > 10:
        prompt += "facing up, "
    elif pitch < -10:
        prompt += "facing down, "
    prompt += "in front view" if math.fabs(yaw) < 10 else "in side view"
    return prompt
