"""Drawing SynthFace people: portraits (one person) and group scenes (2–3 people side by side).

A person is painted back to front — torso (clothing colour), back hair, neck, shaded head, hair cap, wrinkles,
eyes, brows, nose, mouth, glasses — every part from the projected geometry of :mod:`.face_model`, so the
annotations returned with the pixels (box, 5 keypoints, 68 landmarks, pose) are exact.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .face_model import FaceLayout, Head, Pose2D, face_layout
from .raster import Canvas, offset_polygon, polygon_coverage
from .world import (
    BACKGROUNDS,
    CLOTHING,
    PLACEMENT_X,
    POSE_YAW,
    PROMPT_EXPRESSION,
    Identity,
    ImageVariation,
    SceneAttributes,
    grid_prompt,
)

__all__ = ["HEAD_SCALE", "HEAD_CENTRE_Y", "render_portrait", "render_group", "draw_person", "face_annotation"]

#: head scale (pixels per face unit) as a fraction of the image height: close-up portraits, face boxes about
#: 37 px wide at 64² (30 px at the earlier 0.24). Bigger faces keep more of the expression through the 64-px VAE
#: (docs/demo.md, "what moved what"); 0.30 still leaves a strip of the shirt (a caption attribute) in the frame.
HEAD_SCALE = 0.30
#: vertical position of the head centre as a fraction of the image height
HEAD_CENTRE_Y = 0.41


def _shade(colour, k) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float64) * k, 0.0, 1.0)


def _hairline(ident: Identity, u: np.ndarray) -> np.ndarray | None:
    """Height (head frame) above which the hair cap covers the head, as a function of frontal ``u``."""
    style = ident.hair_style
    if style == "bald":
        return None
    q = np.clip(np.abs(u) / ident.head_width, 0.0, 1.0)
    hh, hl = ident.head_height, ident.hairline
    side = ident.eye_y - 0.1
    if style in ("fringe", "bob"):
        top = ident.eye_y - ident.brow_gap - 0.13
        return top + (ident.eye_y - 0.02 - top) * q ** 6
    if style in ("side-part", "long"):
        top = -0.6 * hh * hl
        sweep = 0.22 * (0.5 + 0.5 * np.tanh(3.0 * ident.part_side * np.clip(u / ident.head_width, -1, 1)))
        return top + sweep + (side - top) * q ** 8
    top = {"short": -0.64, "curly": -0.55, "bun": -0.68}[style] * hh * hl
    return top + (side - top) * q ** 8


def _back_hair(ident: Identity, head: Head) -> np.ndarray | None:
    if ident.hair_style not in ("long", "bob"):
        return None
    hh, w = ident.head_height, ident.head_width
    y_end = hh + 0.9 if ident.hair_style == "long" else hh * 0.8
    hw = w + ident.hair_volume + (0.16 if ident.hair_style == "long" else 0.1)
    shift = -0.35 * math.sin(head.psi)
    flare = 1.12 if ident.hair_style == "long" else 1.04
    xs = np.array([-hw, hw, hw * flare, hw * flare * 0.92, 0.6 * hw, -0.6 * hw, -hw * flare * 0.92, -hw * flare])
    ys = np.array([-0.3 * hh, -0.3 * hh, y_end - 0.12, y_end, y_end + 0.04, y_end + 0.04, y_end, y_end - 0.12])
    xs = xs + shift
    return head.to_image(xs, ys)


def draw_person(canvas: Canvas, ident: Identity, expression: str, pose: Pose2D, clothing_rgb, light: float = 1.0,
                intensity: float = 1.0) -> FaceLayout:
    """Paint one person onto ``canvas``; returns the face layout (with the exact annotations)."""
    lay = face_layout(ident, expression, pose, intensity)
    head, s = lay.head, pose.scale
    hh, w = ident.head_height, ident.head_width
    skin = _shade(ident.skin, light)
    hair = _shade(ident.hair, light)

    # torso (turns less than the head; no roll) and the neck
    body_c = math.cos(0.35 * head.psi)
    shoulders = np.array([(-0.5, hh + 0.3), (-1.3, hh + 0.52), (-1.85, hh + 0.95), (-2.05, hh + 4.0),
                          (2.05, hh + 4.0), (1.85, hh + 0.95), (1.3, hh + 0.52), (0.5, hh + 0.3)])
    torso = np.stack([shoulders[:, 0] * body_c + 0.2 * math.sin(head.psi), shoulders[:, 1]], -1) * s + head.centre
    win = canvas.window(torso, 1.5)
    if win is not None:
        fade = np.clip((win.Y - head.centre[1]) / (s * 4.0), 0, 1)[..., None]
        cloth = _shade(clothing_rgb, light) * (1.0 - 0.18 * fade)
        canvas.blend(win, polygon_coverage(win, torso), cloth)
    back = _back_hair(ident, head)
    if back is not None:
        canvas.polygon(back, _shade(hair, 0.85))
    if ident.hair_style == "bun":
        canvas.polygon(head.to_image(0.32 * np.cos(np.linspace(0, 2 * math.pi, 16, endpoint=False)),
                                     -hh - 0.1 + 0.26 * np.sin(np.linspace(0, 2 * math.pi, 16, endpoint=False))),
                       hair)
    neck = np.array([(-0.36 * w, 0.5 * hh), (0.36 * w, 0.5 * hh), (0.42, hh + 0.32), (0.0, hh + 0.62),
                     (-0.42, hh + 0.32)])
    neck[:, 0] = neck[:, 0] * body_c + 0.1 * math.sin(head.psi)
    canvas.polygon(neck * s + head.centre, _shade(skin, 0.8))

    # head: skin shaded by how much each point faces the camera
    outline = head.silhouette()
    win = canvas.window(outline, 2.0 + (ident.hair_volume * 1.3 + 0.05) * s)
    if win is None:
        return lay
    head_cov = polygon_coverage(win, outline)
    u, yh, facing, _ = head.frontal_coords(win.X, win.Y)
    shade = (0.74 + 0.26 * np.clip(facing, 0, 1))[..., None]
    canvas.blend(win, head_cov, skin * shade)
    line = _hairline(ident, u)
    if line is not None:
        # full volume on the crown, fading out towards the sideburns
        y_side = float(_hairline(ident, np.array([ident.head_width]))[0])
        y_vert = ((outline - head.centre) @ head.rot)[:, 1] / s
        grow = ident.hair_volume * s * np.clip((y_side - y_vert) / 0.6, 0.0, 1.0)
        if ident.hair_style == "curly":
            ang = np.arctan2(outline[:, 1] - head.centre[1], outline[:, 0] - head.centre[0])
            grow = grow * (1.0 + 0.18 * np.sin(9.0 * ang))
        cap = polygon_coverage(win, offset_polygon(outline, grow)) * np.clip(0.5 + (line - yh) * s, 0.0, 1.0)
        canvas.blend(win, cap, hair * (0.86 + 0.14 * np.clip(facing, 0, 1))[..., None])

    in_head = np.zeros((canvas.height, canvas.width))
    in_head[win.sl] = head_cov
    fine = max(0.55, 0.03 * s)
    for pts, alpha in lay.wrinkles:
        canvas.stroke(pts, fine, _shade(skin, 0.7), alpha=alpha, clip=in_head)

    # eyes
    for eye in lay.eyes:
        white = eye["white"]
        canvas.polygon(white, (0.96, 0.96, 0.94), clip=in_head)
        in_eye = canvas.mask(white) * in_head
        canvas.polygon(eye["iris"], _shade(ident.eyes, light), clip=in_eye)
        canvas.polygon(eye["pupil"], (0.04, 0.04, 0.05), clip=in_eye)
        canvas.stroke(eye["lid"], max(0.6, 0.04 * s), _shade(ident.hair, 0.45), clip=in_head)
    for brow in lay.brows:
        canvas.stroke(brow, lay.brow_width, _shade(hair, 0.8), clip=in_head)

    # nose: a slightly darker body, the ridge line when turned, nostrils
    canvas.polygon(lay.nose_body, _shade(skin, 0.9), clip=in_head)
    turn = min(1.0, abs(math.sin(head.psi)) * 2.0)
    if turn > 0.05:
        canvas.stroke(lay.nose_ridge, fine, _shade(skin, 0.68), alpha=turn, clip=in_head)
    for nostril in lay.nostrils:
        canvas.polygon(nostril, _shade(skin, 0.42), clip=in_head)

    # mouth
    lips = _shade(ident.lips, light)
    canvas.polygon(lay.lips_outer, lips, clip=in_head)
    if lay.mouth_inner is not None:
        inner = lay.mouth_inner
        canvas.polygon(inner, (0.28, 0.05, 0.07), clip=in_head)
        if lay.teeth is not None:
            canvas.polygon(lay.teeth, (0.96, 0.95, 0.9), clip=canvas.mask(inner) * in_head)
    else:
        canvas.stroke(lay.lip_line, fine, _shade(lips, 0.5), clip=in_head)

    # glasses: two rims, then the bridge and the visible arms
    if lay.glasses:
        frame = _shade(ident.glasses_colour, light)
        thick = max(0.7, 0.045 * s)
        for k, part in enumerate(lay.glasses):
            canvas.stroke(part, thick, frame, closed=k < 2)
    return lay


def face_annotation(lay: FaceLayout, expression: str, pose_name: str) -> dict[str, Any]:
    """The exact face values of one drawn face (JSON-ready)."""
    from dynamicid_jax.faces import auto_face_prompt

    pose = lay.head.pose.pose
    return {
        "bbox": [round(float(v), 4) for v in lay.bbox],
        "kps": np.round(lay.kps, 4).tolist(),
        "landmarks": np.round(lay.landmarks, 4).tolist(),
        "landmarks_visible": [bool(v) for v in lay.landmarks_visible],
        "pose": [round(float(v), 4) for v in pose],
        "expression": expression,
        "pose_name": pose_name,
        "face_prompt": auto_face_prompt(pose, PROMPT_EXPRESSION[expression]),
        "grid_prompt": grid_prompt(expression, pose_name),
    }


def _background(height: int, width: int, name: str, variation: ImageVariation) -> Canvas:
    canvas = Canvas(height, width)
    base = np.asarray(BACKGROUNDS[name], np.float64) * variation.light
    ramp = 1.0 + variation.background_shade * (0.5 - np.arange(height) / max(height - 1, 1)) * 2.0
    canvas.rgb[...] = np.clip(base[None, None, :] * ramp[:, None, None], 0, 1)
    return canvas


def _pose2d(pose_name: str, variation: ImageVariation, cx: float, cy: float, size: int) -> Pose2D:
    return Pose2D(yaw=POSE_YAW[pose_name] + variation.yaw_jitter, roll=variation.roll, cx=cx, cy=cy,
                  scale=size * HEAD_SCALE * variation.scale)


def render_portrait(ident: Identity, expression: str, pose_name: str, scene: SceneAttributes,
                    variation: ImageVariation, size: int = 64) -> tuple[np.ndarray, dict[str, Any]]:
    """One person, ``size``² pixels → ``(uint8 [size, size, 3], face annotation)``."""
    if int(size) < 32:
        raise ValueError(f"image size must be at least 32 pixels, got {size}")
    canvas = _background(size, size, scene.background, variation)
    cx = size * (PLACEMENT_X[scene.placement] + variation.dx)
    cy = size * (HEAD_CENTRE_Y + variation.dy)
    lay = draw_person(canvas, ident, expression, _pose2d(pose_name, variation, cx, cy, size),
                      CLOTHING[scene.clothing], variation.light, variation.intensity)
    return canvas.to_uint8(), face_annotation(lay, expression, pose_name)


def render_group(people: list[dict[str, Any]], background: str, variation: ImageVariation,
                 size: int = 64) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """2–3 (or more) people side by side on a ``size × (n·size)`` canvas, person ``i`` centred in strip ``i``.

    ``people``: dicts with ``identity`` (:class:`Identity`), ``expression``, ``pose_name``, ``clothing`` and
    ``variation`` (:class:`ImageVariation`, its offsets are fractions of the strip). Returns the image and one
    annotation per person, each with its layout ``box`` (normalised ``[y0, x0, y1, x1]`` of its strip).
    """
    n = len(people)
    if n < 1:
        raise ValueError("render_group needs at least one person")
    canvas = _background(size, size * n, background, variation)
    faces = []
    for k, p in enumerate(people):
        var: ImageVariation = p["variation"]
        cx = size * (k + 0.5 + var.dx)
        cy = size * (HEAD_CENTRE_Y + var.dy)
        lay = draw_person(canvas, p["identity"], p["expression"], _pose2d(p["pose_name"], var, cx, cy, size),
                          CLOTHING[p["clothing"]], variation.light, var.intensity)
        ann = face_annotation(lay, p["expression"], p["pose_name"])
        ann["box"] = [0.0, k / n, 1.0, (k + 1) / n]
        faces.append(ann)
    return canvas.to_uint8(), faces
