"""SynthFace's 2.5D head: one geometry from which both the pixels and the landmarks come.

The head is a stack of horizontal elliptic cross-sections: at height ``y`` (head frame, face units) the section
has half-width ``a(y)`` (a superellipse outline narrowed towards the chin) and half-depth ``b(y) = depth_ratio ·
a(y)``. A feature point is given in *frontal* coordinates ``(u, y)`` plus an outward offset ``dz`` (nose, lips);
it sits on the surface at ``z = b(y)·sqrt(1 − (u/a(y))²) + dz``. A pose rotates it by ``R = R_z(roll) · R_y(yaw)``
(pitch is always 0 in SynthFace) and an orthographic camera maps it to pixels::

    x' = u·cos(yaw) + z·sin(yaw),   [X, Y] = centre + scale · R_2d(roll) · [x', y]

so yaw > 0 turns the face to the image's right, roll > 0 rotates it clockwise (the convention of
``dynamicid_jax.faces.Face.pose``). The outline of a rotated section is ``|x'| ≤ C(y) = sqrt((a·cos yaw)² +
(b·sin yaw)²)`` and the map is invertible row by row (``frontal_coords``), which the renderer uses for shading and
the hairline. Landmarks (68, iBUG order) and the 5 keypoints are projections of the same points the renderer
draws, so they are exact.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .world import EXPRESSIONS, Identity

__all__ = ["ExpressionShape", "EXPRESSION_SHAPES", "EXPRESSION_STRENGTH", "Pose2D", "Head", "FaceLayout", "face_layout",
           "kps_from_landmarks"]


@dataclasses.dataclass(frozen=True)
class ExpressionShape:
    """How an expression moves the features (all offsets in face units; 0 / 1 = neutral)."""

    mouth_lift: float = 0.0      # corners up (+)
    mouth_open: float = 0.0      # inner-lip gap at the centre
    mouth_width: float = 1.0
    mouth_round: float = 0.8     # exponent of the opening's profile (lower = rounder, "O" mouth)
    teeth: bool = False
    lip_scale: float = 1.0       # lip thickness factor (pressed lips < 1)
    sneer: float = 0.0           # one-sided upper-lip raise
    brow_raise: float = 0.0
    brow_inner: float = 0.0      # inner brow ends up (+, sad / afraid) or down (−, angry)
    upper_lid: float = 1.0       # eye opening above / below the eye line
    lower_lid: float = 0.8
    forehead_lines: float = 0.0  # wrinkle strengths (alpha)
    frown_lines: float = 0.0
    nose_wrinkle: float = 0.0


EXPRESSION_SHAPES = {
    "neutral": ExpressionShape(),
    "happy": ExpressionShape(mouth_lift=0.2, mouth_open=0.1, mouth_width=1.4, teeth=True, brow_raise=0.03,
                             upper_lid=0.85, lower_lid=0.3),
    "sad": ExpressionShape(mouth_lift=-0.16, mouth_width=0.88, lip_scale=1.15, brow_inner=0.17, brow_raise=0.02,
                           upper_lid=0.6, lower_lid=0.8),
    "surprised": ExpressionShape(mouth_open=0.3, mouth_width=0.66, mouth_round=0.5, lip_scale=0.8,
                                 brow_raise=0.18, upper_lid=1.5, lower_lid=1.1, forehead_lines=0.7),
    "angry": ExpressionShape(mouth_lift=-0.04, mouth_width=0.85, lip_scale=0.4, brow_raise=-0.07,
                             brow_inner=-0.17, upper_lid=0.5, lower_lid=0.7, frown_lines=0.9),
    "disgusted": ExpressionShape(mouth_lift=-0.09, mouth_open=0.06, mouth_width=0.95, teeth=True, sneer=0.12,
                                 brow_raise=-0.04, brow_inner=-0.07, upper_lid=0.55, lower_lid=0.45,
                                 nose_wrinkle=1.0),
    "afraid": ExpressionShape(mouth_lift=-0.06, mouth_open=0.18, mouth_width=1.05, mouth_round=0.9, teeth=True,
                              brow_raise=0.13, brow_inner=0.12, upper_lid=1.45, lower_lid=1.05, forehead_lines=0.5),
}
assert set(EXPRESSION_SHAPES) == set(EXPRESSIONS)


#: How strongly every expression is drawn, on top of each image's own intensity (0.85–1.15): 1.8 since schema
#: synthface/3. At the nominal strength a 64² face showed its expression too faintly to survive the VAE (the
#: evaluation classifier read 0.63 of clean front views and 0.41 after a round trip; at 1.8: 0.83 and 0.54 —
#: docs/demo.md, "What moved what").
EXPRESSION_STRENGTH = 1.8


def _scaled(shape: ExpressionShape, k: float) -> ExpressionShape:
    """Expression strength ``k`` (1 = nominal): offsets scale by k, factors move towards 1 by k."""
    neutral = ExpressionShape()
    out = {}
    for f in dataclasses.fields(shape):
        v, v0 = getattr(shape, f.name), getattr(neutral, f.name)
        out[f.name] = v if isinstance(v, bool) else v0 + k * (v - v0)
    return ExpressionShape(**out)


@dataclasses.dataclass(frozen=True)
class Pose2D:
    """Where and how a head is drawn: yaw / roll in degrees, centre and scale (pixels per face unit)."""

    yaw: float
    roll: float
    cx: float
    cy: float
    scale: float

    @property
    def pose(self) -> list[float]:
        """``(pitch, yaw, roll)`` in degrees, as ``Face.pose``."""
        return [0.0, float(self.yaw), float(self.roll)]


class Head:
    """The head surface of one identity under one pose (see the module docstring)."""

    def __init__(self, ident: Identity, pose: Pose2D):
        self.ident = ident
        self.pose = pose
        self.psi = math.radians(pose.yaw)
        r = math.radians(pose.roll)
        self.rot = np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
        self.centre = np.array([pose.cx, pose.cy])

    # ---- surface
    def half_width(self, y: np.ndarray) -> np.ndarray:
        i = self.ident
        q = np.clip(np.abs(np.asarray(y, np.float64)) / i.head_height, 0.0, 1.0)
        base = (1.0 - q ** i.squareness) ** (1.0 / i.squareness)
        lower = np.clip(np.asarray(y, np.float64) / i.head_height, 0.0, 1.0)
        return i.head_width * base * (1.0 - i.chin_taper * lower ** 2)

    def surface_z(self, u: np.ndarray, y: np.ndarray) -> np.ndarray:
        a = np.maximum(self.half_width(y), 1e-6)
        return self.ident.depth_ratio * a * np.sqrt(np.clip(1.0 - (np.asarray(u) / a) ** 2, 0.0, 1.0))

    # ---- projection
    def rotate(self, u, y, dz=0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frontal ``(u, y)`` + outward ``dz`` → rotated head-frame ``(x', y, z')``."""
        u = np.asarray(u, np.float64)
        y = np.asarray(y, np.float64) + 0.0 * u
        z = self.surface_z(u, y) + dz
        c, s = math.cos(self.psi), math.sin(self.psi)
        return u * c + z * s, y, -u * s + z * c

    def to_image(self, xr, y) -> np.ndarray:
        """Rotated head-frame ``(x', y)`` → image pixels ``[..., 2]``."""
        pts = np.stack(np.broadcast_arrays(np.asarray(xr, np.float64), np.asarray(y, np.float64)), -1)
        return self.centre + self.pose.scale * pts @ self.rot.T

    def project(self, u, y, dz=0.0) -> np.ndarray:
        xr, yy, _ = self.rotate(u, y, dz)
        return self.to_image(xr, yy)

    def visible(self, u, y) -> np.ndarray:
        """Whether surface points ``(u, y)`` face the camera (not hidden behind the head)."""
        u = np.asarray(u, np.float64)
        a = np.maximum(self.half_width(y), 1e-6)
        t = np.arcsin(np.clip(u / a, -1, 1))
        b = self.ident.depth_ratio * a
        delta = np.arctan2(b * math.sin(self.psi), a * math.cos(self.psi))
        return np.abs(t + delta) <= math.pi / 2 + 1e-9

    def outline_halfwidth(self, y) -> np.ndarray:
        a = self.half_width(y)
        b = self.ident.depth_ratio * a
        return np.sqrt((a * math.cos(self.psi)) ** 2 + (b * math.sin(self.psi)) ** 2)

    def silhouette(self, y_from: float | None = None, y_to: float | None = None, n: int = 40) -> np.ndarray:
        """The outline of the head between two heights as an image polygon ``[2n, 2]`` (clockwise)."""
        h = self.ident.head_height
        lo = -h if y_from is None else y_from
        hi = h if y_to is None else y_to
        t = 0.5 - 0.5 * np.cos(np.linspace(0.0, math.pi, n))  # denser near the top and the chin
        ys = lo + (hi - lo) * t
        c = self.outline_halfwidth(ys)
        right = self.to_image(c, ys)
        left = self.to_image(-c, ys)[::-1]
        return np.concatenate([right, left], 0)

    def frontal_coords(self, X: np.ndarray, Y: np.ndarray):
        """Image pixels → ``(u, y, facing, inside)``: frontal coordinates of the surface point seen there.

        Outside the outline ``u`` is that of the nearest outline point of the same row; ``facing`` ∈ [0, 1] is
        the cosine between the section's outward direction and the view ray (1 = facing the camera).
        """
        p = np.stack([X - self.centre[0], Y - self.centre[1]], -1) / self.pose.scale
        local = p @ self.rot  # inverse rotation
        xr, y = local[..., 0], local[..., 1]
        a = np.maximum(self.half_width(y), 1e-6)
        b = self.ident.depth_ratio * a
        c = np.sqrt((a * math.cos(self.psi)) ** 2 + (b * math.sin(self.psi)) ** 2)
        delta = np.arctan2(b * math.sin(self.psi), a * math.cos(self.psi))
        ratio = xr / c
        inside = (np.abs(ratio) <= 1.0) & (np.abs(y) <= self.ident.head_height)
        phase = np.arcsin(np.clip(ratio, -1.0, 1.0))
        u = a * np.sin(phase - delta)
        return u, y, np.cos(phase), inside


def kps_from_landmarks(lmk: np.ndarray) -> np.ndarray:
    """Insightface-order keypoints from the 68 landmarks: eye centres, nose tip (30), mouth corners (48, 54)."""
    return np.stack([lmk[36:42].mean(0), lmk[42:48].mean(0), lmk[30], lmk[48], lmk[54]])


@dataclasses.dataclass
class FaceLayout:
    """Everything the renderer draws for one face, in image pixels, plus the exact annotations."""

    head: Head
    landmarks: np.ndarray          # [68, 2]
    landmarks_visible: np.ndarray  # [68] bool
    kps: np.ndarray                # [5, 2]
    bbox: np.ndarray               # [4] x0, y0, x1, y1
    eyes: list[dict]               # per eye: white polygon, iris / pupil polygons, upper-lid polyline
    brows: list[np.ndarray]        # polylines
    brow_width: float              # pixels
    nose_body: np.ndarray          # polygon
    nose_ridge: np.ndarray         # polyline
    nostrils: list[np.ndarray]     # polygons
    lips_outer: np.ndarray         # polygon
    mouth_inner: np.ndarray | None  # polygon (None when closed)
    teeth: np.ndarray | None        # polygon band under the upper lip
    lip_line: np.ndarray           # polyline between the lips
    wrinkles: list[tuple[np.ndarray, float]]  # (polyline, alpha)
    glasses: list[np.ndarray]      # closed rims then open polylines (bridge, arms)
    shape: ExpressionShape


def _circle(head: Head, u0: float, y0: float, r: float, n: int = 14, dz: float = 0.0) -> np.ndarray:
    ang = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return head.project(u0 + r * np.cos(ang), y0 + r * np.sin(ang), dz)


def face_layout(ident: Identity, expression: str, pose: Pose2D, intensity: float = 1.0) -> FaceLayout:
    """The projected features and the exact annotations of ``ident`` showing ``expression`` under ``pose``."""
    if expression not in EXPRESSION_SHAPES:
        raise ValueError(f"expression must be one of {', '.join(EXPRESSIONS)}; got {expression!r}")
    ex = _scaled(EXPRESSION_SHAPES[expression], EXPRESSION_STRENGTH * float(intensity))
    i = ident
    head = Head(ident, pose)
    lmk_uv = np.zeros((68, 2))
    lmk_dz = np.zeros(68)

    # --- jaw 0..16: image-left temple → chin → image-right temple, just inside the outline
    y_top, y_chin = i.eye_y + 0.02, i.head_height * 0.985
    w = np.linspace(-1.0, 1.0, 17)
    jy = y_top + (y_chin - y_top) * np.cos(0.5 * math.pi * w)
    lmk_uv[0:17] = np.stack([np.sign(w) * head.half_width(jy) * 0.97, jy], -1)

    # --- eyes 36..47
    eyes = []
    s_dense = np.linspace(-1.0, 1.0, 15)
    for side in (-1.0, 1.0):
        cx, rx = side * i.eye_spacing, i.eye_size
        ry = rx * i.eye_aspect

        def lid(s, upper, side=side, cx=cx, rx=rx, ry=ry):
            outer = np.clip(-side * s, 0, 1)  # 1 at the outer corner
            sad_droop = 0.04 * max(0.0, 1.0 - ex.upper_lid) * outer if upper else 0.0
            y_corner = i.eye_y - i.eye_tilt * (-side * s)
            amp = ry * (ex.upper_lid if upper else ex.lower_lid)
            prof = (1.0 - s ** 2) ** (0.55 if upper else 0.65)
            return cx + rx * s, y_corner + (-amp * prof + sad_droop if upper else amp * prof)

        up_u, up_y = lid(s_dense, True)
        lo_u, lo_y = lid(s_dense[::-1], False)
        white = head.project(np.concatenate([up_u, lo_u[1:-1]]), np.concatenate([up_y, lo_y[1:-1]]))
        ir = rx * i.iris_ratio
        eyes.append({"white": white, "iris": _circle(head, cx, i.eye_y, ir), "pupil": _circle(head, cx, i.eye_y,
                     ir * 0.45, 10), "lid": head.project(up_u, up_y), "centre": head.project(cx, i.eye_y)})
        # 36..41 (image-left eye) and 42..47 (image-right eye) follow the same pattern: corner, two upper-lid
        # points, corner (left → right), then two lower-lid points (right → left)
        pattern = ((-1.0, True), (-1 / 3, True), (1 / 3, True), (1.0, True), (1 / 3, False), (-1 / 3, False))
        uv = np.array([[float(c[0]) for c in lid(np.array([s]), up)] for s, up in pattern])
        lmk_uv[slice(36, 42) if side < 0 else slice(42, 48)] = uv

    # --- brows 17..26 (each brow left → right in the image)
    brows = []
    for side, sl in ((-1.0, slice(17, 22)), (1.0, slice(22, 27))):

        def brow(s, side=side):
            inner = np.clip(side * -s * 0.5 + 0.5, 0, 1)  # 1 at the end nearest the midline
            u = side * i.eye_spacing + i.eye_size * i.brow_length * s
            y = (i.eye_y - i.brow_gap - ex.brow_raise - i.brow_arch * (1 - s ** 2) - ex.brow_inner * inner ** 1.5
                 + 0.03 * (1 - inner))
            return u, y

        lmk_uv[sl] = np.stack(brow(np.linspace(-1.0, 1.0, 5)), -1)
        lmk_dz[sl] = 0.01
        brows.append(head.project(*brow(np.linspace(-1.0, 1.0, 9)), 0.01))

    # --- nose 27..35
    yn = i.eye_y + i.nose_length
    ridge_t = np.array([0.0, 1 / 3, 2 / 3, 1.0])
    lmk_uv[27:31] = np.stack([np.zeros(4), i.eye_y + ridge_t * i.nose_length], -1)
    lmk_dz[27:31] = i.nose_depth * np.array([0.15, 0.45, 0.75, 1.0])
    nw = i.nose_width
    lmk_uv[31:36] = np.array([[-nw, yn + 0.05], [-nw / 2, yn + 0.075], [0.0, yn + 0.085], [nw / 2, yn + 0.075],
                              [nw, yn + 0.05]])
    lmk_dz[31:36] = i.nose_depth * np.array([0.2, 0.5, 0.6, 0.5, 0.2])
    nose_top = [(-0.05, i.eye_y + 0.06, 0.12 * i.nose_depth), (0.05, i.eye_y + 0.06, 0.12 * i.nose_depth)]
    body_uv = [nose_top[1], (nw * 0.9, yn - 0.04, 0.25 * i.nose_depth), tuple(lmk_uv[35]) + (lmk_dz[35],),
               tuple(lmk_uv[34]) + (lmk_dz[34],), tuple(lmk_uv[33]) + (lmk_dz[33],), tuple(lmk_uv[32]) + (lmk_dz[32],),
               tuple(lmk_uv[31]) + (lmk_dz[31],), (-nw * 0.9, yn - 0.04, 0.25 * i.nose_depth), nose_top[0]]
    body = np.array(body_uv)
    nose_body = head.project(body[:, 0], body[:, 1], body[:, 2])
    nose_ridge = head.project(np.zeros(5), i.eye_y + np.linspace(0.05, 1.0, 5) * i.nose_length,
                              i.nose_depth * np.linspace(0.15, 1.0, 5))
    nostrils = [_circle(head, side * nw * 0.5, yn + 0.06, 0.035, 8, 0.45 * i.nose_depth) for side in (-1, 1)]

    # --- mouth 48..67
    ym = yn + i.mouth_gap
    mw = i.mouth_width * ex.mouth_width
    op = ex.mouth_open
    tu, tl = i.upper_lip * ex.lip_scale, i.lower_lip * ex.lip_scale

    def mouth_curves(s):
        centre = ym - ex.mouth_lift * s ** 2
        sneer = ex.sneer * np.clip(i.sneer_side * s, 0, 1) ** 0.7 * (1 - s ** 2) ** 0.3
        f_open = (1 - s ** 2) ** ex.mouth_round
        f_lip = (1 - s ** 2) ** 0.6
        ui = centre - 0.5 * op * f_open - sneer
        li = centre + 0.5 * op * f_open
        return centre, ui - tu * f_lip, ui, li, li + tl * f_lip

    lip_dz = 0.05
    s_d = np.linspace(-1.0, 1.0, 17)
    _, uo, ui, li, lo = mouth_curves(s_d)
    u_d = mw * s_d
    lips_outer = head.project(np.concatenate([u_d, u_d[::-1][1:-1]]), np.concatenate([uo, lo[::-1][1:-1]]), lip_dz)
    inner_u = 0.9 * u_d
    mouth_inner = teeth = None
    if op > 0.02:
        mouth_inner = head.project(np.concatenate([inner_u, inner_u[::-1][1:-1]]),
                                   np.concatenate([ui, li[::-1][1:-1]]), lip_dz)
        if ex.teeth:
            band = np.minimum(ui + 0.55 * op, li)
            teeth = head.project(np.concatenate([inner_u, inner_u[::-1]]), np.concatenate([ui, band[::-1]]), lip_dz)
    lip_line = head.project(inner_u, 0.5 * (ui + li), lip_dz)
    s_o = np.array([-1.0, -2 / 3, -1 / 3, 0.0, 1 / 3, 2 / 3, 1.0])
    c_o, uo_o, _, _, lo_o = mouth_curves(s_o)
    lmk_uv[48:55] = np.stack([mw * s_o, np.where(np.abs(s_o) == 1, c_o, uo_o)], -1)
    lmk_uv[55:60] = np.stack([mw * s_o[5:0:-1], lo_o[5:0:-1]], -1)
    s_i = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    c_i, _, ui_i, li_i, _ = mouth_curves(s_i)
    lmk_uv[60:65] = np.stack([0.9 * mw * s_i, np.where(np.abs(s_i) == 1, c_i, ui_i)], -1)
    lmk_uv[65:68] = np.stack([0.9 * mw * s_i[3:0:-1], li_i[3:0:-1]], -1)
    lmk_dz[48:68] = lip_dz

    landmarks = head.project(lmk_uv[:, 0], lmk_uv[:, 1], lmk_dz)
    visible = head.visible(lmk_uv[:, 0], lmk_uv[:, 1])

    # --- wrinkles (expression cues)
    wrinkles: list[tuple[np.ndarray, float]] = []
    if ex.forehead_lines > 0:
        for k in range(3):
            yy = i.eye_y - i.brow_gap - 0.16 - 0.08 * k - ex.brow_raise
            uu = np.linspace(-0.4, 0.4, 7)
            wrinkles.append((head.project(uu, yy - 0.03 * np.cos(uu * 3)), ex.forehead_lines))
    if ex.frown_lines > 0:
        for side in (-1, 1):
            wrinkles.append((head.project(np.array([side * 0.06, side * 0.08]),
                                          np.array([i.eye_y - i.brow_gap + 0.02, i.eye_y - i.brow_gap - 0.12])),
                             ex.frown_lines))
    if ex.nose_wrinkle > 0:
        for side in (-1, 1):
            wrinkles.append((head.project(np.array([side * 0.04, side * 0.12]), np.array([i.eye_y + 0.08,
                             i.eye_y + 0.14]), 0.2 * i.nose_depth), ex.nose_wrinkle))
            wrinkles.append((head.project(np.array([side * (nw + 0.05), side * (mw + 0.02)]),
                             np.array([yn + 0.02, ym - 0.02])), 0.6 * ex.nose_wrinkle))

    # --- glasses
    glasses: list[np.ndarray] = []
    if i.glasses != "none":
        rr = i.eye_size * i.glasses_size
        for side in (-1.0, 1.0):
            cx = side * i.eye_spacing
            if i.glasses == "round":
                ang = np.linspace(0, 2 * math.pi, 20, endpoint=False)
                ru, rv = cx + rr * np.cos(ang), i.eye_y + 0.85 * rr * np.sin(ang)
            else:
                t = np.linspace(0, 1, 6, endpoint=False)
                ru = np.concatenate([cx - rr + 2 * rr * t, np.full(6, cx + rr), cx + rr - 2 * rr * t,
                                     np.full(6, cx - rr)])
                rv = np.concatenate([np.full(6, i.eye_y - 0.7 * rr), i.eye_y - 0.7 * rr + 1.4 * rr * t,
                                     np.full(6, i.eye_y + 0.7 * rr), i.eye_y + 0.7 * rr - 1.4 * rr * t])
            glasses.append(head.project(ru, rv, 0.06))
        glasses.append(head.project(np.linspace(-i.eye_spacing + rr, i.eye_spacing - rr, 5),
                                    np.full(5, i.eye_y - 0.2 * rr), 0.06 + 0.1 * i.nose_depth))
        for side in (-1.0, 1.0):
            a_e = float(head.half_width(i.eye_y))
            uu = np.array([side * (i.eye_spacing + rr), side * a_e * 0.98])
            arm = head.project(uu, np.full(2, i.eye_y - 0.3 * rr), np.array([0.06, 0.0]))
            if head.visible(uu[1:], np.array([i.eye_y]))[0]:
                glasses.append(arm)

    # --- box: the outline from the forehead down to the chin
    y_fore = i.eye_y - i.brow_gap - 0.3
    outline = head.silhouette(y_fore, i.head_height, 24)
    pts = np.concatenate([outline, landmarks[visible]], 0)
    bbox = np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])
    return FaceLayout(head=head, landmarks=landmarks, landmarks_visible=visible, kps=kps_from_landmarks(landmarks),
                      bbox=bbox, eyes=eyes, brows=brows, brow_width=i.brow_thickness * pose.scale,
                      nose_body=nose_body, nose_ridge=nose_ridge, nostrils=nostrils, lips_outer=lips_outer,
                      mouth_inner=mouth_inner, teeth=teeth, lip_line=lip_line, wrinkles=wrinkles, glasses=glasses,
                      shape=ex)
