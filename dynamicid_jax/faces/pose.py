"""Head pose from 2D landmarks: a least-squares fit of a generic 3D face under a scaled-orthographic camera.

Method (closed form, no solvePnP, numpy only):

1. Centre the 2D landmarks ``x`` (``[n, 2]``, image pixels) and the matching points ``X`` (``[n, 3]``) of a generic
   3D face.
2. Solve the affine camera ``A`` (``2 × 3``) of ``x ≈ X Aᵀ`` by linear least squares.
3. Replace ``A`` by the nearest matrix with orthonormal rows (``A = U S Vᵀ → R₂ = U Vᵀ``; ``S`` is the scale,
   unused) and complete the rotation with ``r₃ = r₁ × r₂``.
4. Read Euler angles from ``R = R_z(roll) · R_y(yaw) · R_x(pitch)``.

Frame and signs (identical to insightface's ``pose`` output, so both backends agree): the model and the image
share axes x → image right, y → image down, z → towards the camera. Then
``pitch > 0`` = facing up, ``yaw > 0`` = facing the image's right, ``roll > 0`` = the face rotated clockwise in
the image.

The generic face is our own: its frontal x/y layout is the median (mirror-symmetrised) dlib landmark layout
of ~20 near-frontal portrait photos, so pitch 0 means "as portraits are usually taken"; the depths z are
rough anthropometric averages. Units: millimetres-like, outer eye corners 90 apart, origin at the nose tip.
It covers the brows, eyes, nose and mouth corners of the 68-point (iBUG / dlib) scheme; the jaw contour and
the lower lip / chin are left out because they slide with the silhouette and with mouth opening. For 5 detector
keypoints the x/y layout is the ArcFace template instead (detectors put the nose point higher than dlib's 30).

Measured: on insightface's mean 3D face (a different shape) rotated by known angles, yaw comes back within
≈3.5° up to ±45° and roll within ≈6°; that face itself reads as ≈17° "facing up" here, so the pitch zero of
this fit and of insightface's 3D-landmark pose can differ by about that much. Expressions move the mouth
corners and so bias pitch by a few degrees (a broad smile reads as facing down).
"""
from __future__ import annotations

import math

import numpy as np

from .analyzer import ARCFACE_TEMPLATE

__all__ = ["GENERIC_FACE_68", "GENERIC_FACE_5", "estimate_pose", "rotation_from_pose", "pose_from_rotation",
           "kps_from_68"]


def _mirror(points: dict[int, tuple[float, float, float]], pairs: list[tuple[int, int]]):
    out = dict(points)
    for left, right in pairs:
        x, y, z = points[left]
        out[right] = (-x, y, z)
    return out


# Image-left half (negative x) and the midline; the image-right half is mirrored.
_HALF = {
    # brows: outer end .. inner end
    17: (-61.0, -50.0, -42.0), 18: (-52.0, -59.0, -34.0), 19: (-38.0, -62.0, -28.0), 20: (-25.0, -60.0, -25.0),
    21: (-13.0, -55.0, -24.0),
    # nose ridge (27 ≈ between the eyes) down to the tip (30); lower nose 31..33
    27: (0.0, -42.0, -22.0), 28: (0.0, -28.0, -15.0), 29: (0.0, -14.0, -7.0), 30: (0.0, 0.0, 0.0),
    31: (-13.0, 7.0, -16.0), 32: (-7.0, 10.0, -13.0), 33: (0.0, 12.0, -13.0),
    # image-left eye: outer corner, upper lid ×2, inner corner, lower lid ×2
    36: (-45.0, -40.0, -38.0), 37: (-37.0, -45.0, -33.0), 38: (-27.0, -45.0, -31.0), 39: (-19.0, -38.0, -30.0),
    40: (-28.0, -37.0, -31.0), 41: (-38.0, -37.0, -33.0),
    # mouth: left corner, upper lip
    48: (-28.0, 28.0, -26.0), 49: (-17.0, 25.0, -18.0), 50: (-7.0, 24.0, -14.0), 51: (0.0, 26.0, -13.0),
}
_PAIRS = [(17, 26), (18, 25), (19, 24), (20, 23), (21, 22), (31, 35), (32, 34),
          (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46), (48, 54), (49, 53), (50, 52)]
_POINTS = _mirror(_HALF, _PAIRS)

#: indices (into the 68-point scheme) used by the fit, and their generic 3D positions ``[n, 3]``
GENERIC_FACE_68_INDEX = np.array(sorted(_POINTS), dtype=np.int64)
GENERIC_FACE_68 = np.array([_POINTS[i] for i in GENERIC_FACE_68_INDEX], dtype=np.float64)


def kps_from_68(landmarks: np.ndarray) -> np.ndarray:
    """The 5 insightface-order keypoints from 68 (iBUG) landmarks: eye centres, nose tip, mouth corners."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (68, 2) and pts.shape != (68, 3):
        raise ValueError(f"expected 68 landmarks [68, 2], got shape {pts.shape}")
    return np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]])


def _generic_face_5() -> np.ndarray:
    # x/y: the ArcFace 5-point template (the average detector keypoints of frontal faces; its nose point sits
    # higher than dlib's point 30), scaled to this model's eye distance; z: the matching depths above.
    eyes = [np.mean([_POINTS[i] for i in range(a, a + 6)], axis=0) for a in (36, 42)]
    depth = np.array([eyes[0][2], eyes[1][2], _POINTS[30][2], _POINTS[48][2], _POINTS[54][2]])
    xy = ARCFACE_TEMPLATE - ARCFACE_TEMPLATE[2]
    xy = xy * (eyes[1][0] - eyes[0][0]) / (ARCFACE_TEMPLATE[1, 0] - ARCFACE_TEMPLATE[0, 0])
    return np.concatenate([xy, depth[:, None]], axis=1)


#: the 5 keypoints (left eye, right eye, nose, left mouth, right mouth) of a generic face, as detectors
#: (insightface's SCRFD) place them; used for analyzers that give no dense landmarks or pose
GENERIC_FACE_5 = _generic_face_5()


def rotation_from_pose(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """``R = R_z(roll) R_y(yaw) R_x(pitch)`` (degrees) in the frame of the module docstring."""
    a, b, g = (math.radians(v) for v in (pitch, yaw, roll))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(g), -math.sin(g), 0], [math.sin(g), math.cos(g), 0], [0, 0, 1]])
    return rz @ ry @ rx


def pose_from_rotation(rot: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rotation_from_pose`: ``(pitch, yaw, roll)`` in degrees, float32."""
    r = np.asarray(rot, dtype=np.float64)
    cos_yaw = math.hypot(r[0, 0], r[1, 0])
    yaw = math.atan2(-r[2, 0], cos_yaw)
    if cos_yaw > 1e-6:
        pitch = math.atan2(r[2, 1], r[2, 2])
        roll = math.atan2(r[1, 0], r[0, 0])
    else:  # gimbal lock (|yaw| = 90°): put everything into pitch
        pitch = math.atan2(-r[1, 2], r[1, 1])
        roll = 0.0
    return np.degrees(np.array([pitch, yaw, roll])).astype(np.float32)


def estimate_pose(landmarks: np.ndarray) -> np.ndarray:
    """``(pitch, yaw, roll)`` in degrees from 68 (iBUG / dlib order) or 5 (insightface ``kps``) image points."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"landmarks: expected [N, 2] image points, got shape {pts.shape}")
    if pts.shape[0] == 68:
        image_pts, model = pts[GENERIC_FACE_68_INDEX], GENERIC_FACE_68
    elif pts.shape[0] == 5:
        image_pts, model = pts, GENERIC_FACE_5
    else:
        raise ValueError(f"pose estimation supports 68 (dlib) or 5 (kps) landmarks, got {pts.shape[0]}")
    if not np.all(np.isfinite(image_pts)):
        raise ValueError("landmarks contain NaN or inf")
    x = image_pts - image_pts.mean(0)
    m = model - model.mean(0)
    affine = np.linalg.lstsq(m, x, rcond=None)[0].T  # [2, 3]
    u, s, vt = np.linalg.svd(affine, full_matrices=False)
    if s[-1] <= 1e-9 * max(s[0], 1e-12):
        raise ValueError("landmarks are degenerate (collinear or coincident); cannot estimate a pose")
    r12 = u @ vt
    rot = np.vstack([r12, np.cross(r12[0], r12[1])])
    return pose_from_rotation(rot)
