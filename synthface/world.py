"""SynthFace's vocabulary and its random parameters: identities, expressions, poses, scene attributes.

Everything random is drawn from ``numpy.random.default_rng`` seeded with a ``SeedSequence`` built from
``(seed, split, index, ...)``, so an identity (or one of its images) depends only on the dataset seed and its own
index — not on how many identities are generated, nor on the order or the number of worker processes.

Units of the face geometry ("face units"): the head's half-width is about 1; the head frame has x → image right,
y → image down, z → towards the camera, origin at the head centre (see ``face_model``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from dynamicid_jax.faces import kdef_grid

__all__ = [
    "EXPRESSIONS", "POSES", "POSE_YAW", "PROMPT_EXPRESSION", "GRID_POSE_PHRASE", "BACKGROUNDS", "CLOTHING",
    "PLACEMENTS", "PLACEMENT_X", "HAIR_STYLES", "GLASSES", "Identity", "SceneAttributes", "ImageVariation",
    "sample_identity", "sample_scene", "sample_variation", "rng_for", "SPLIT_CODES", "grid_prompt",
    "image_name", "identity_name",
]

#: the 7 expressions × 5 poses of every identity: the method's KDEF grid (dynamicid_jax.faces.kdef_grid) — its
#: expression and pose names, their yaws, the grid prompt and the automatic face prompt's labels
EXPRESSIONS, POSES, POSE_YAW, PROMPT_EXPRESSION = kdef_grid.EXPRESSIONS, kdef_grid.POSES, kdef_grid.POSE_YAW, \
    kdef_grid.PROMPT_EXPRESSION
GRID_POSE_PHRASE = kdef_grid.POSE_PHRASE
grid_prompt = kdef_grid.grid_prompt

#: named scene colours (RGB in [0, 1]); captions name them, the scene classifier predicts them
BACKGROUNDS = {
    "red": (0.78, 0.18, 0.16), "orange": (0.93, 0.55, 0.13), "yellow": (0.93, 0.86, 0.25),
    "green": (0.25, 0.62, 0.25), "teal": (0.12, 0.55, 0.56), "blue": (0.2, 0.36, 0.8),
    "purple": (0.5, 0.27, 0.66), "pink": (0.93, 0.56, 0.72), "gray": (0.5, 0.5, 0.5), "white": (0.94, 0.94, 0.92),
}
CLOTHING = {
    "red": (0.8, 0.12, 0.12), "orange": (0.95, 0.5, 0.08), "yellow": (0.95, 0.85, 0.15),
    "green": (0.15, 0.58, 0.2), "blue": (0.13, 0.28, 0.78), "purple": (0.48, 0.2, 0.62),
    "black": (0.08, 0.08, 0.09), "white": (0.95, 0.95, 0.95), "gray": (0.52, 0.52, 0.54),
    "brown": (0.45, 0.28, 0.14),
}
PLACEMENTS = ("left", "center", "right")
#: horizontal head centre per placement; close-up heads leave only a small shift inside the frame
PLACEMENT_X = {"left": 0.45, "center": 0.5, "right": 0.55}
PLACEMENT_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}

HAIR_STYLES = ("bald", "short", "fringe", "side-part", "long", "bob", "curly", "bun")
GLASSES = ("none", "round", "square")

_SKIN = np.array([(0.98, 0.86, 0.76), (0.95, 0.78, 0.65), (0.87, 0.68, 0.53), (0.78, 0.58, 0.42),
                  (0.66, 0.46, 0.31), (0.53, 0.36, 0.24), (0.40, 0.27, 0.18), (0.30, 0.2, 0.14)])
_HAIR = np.array([(0.08, 0.07, 0.07), (0.22, 0.14, 0.08), (0.42, 0.26, 0.14), (0.55, 0.22, 0.1),
                  (0.86, 0.72, 0.42), (0.78, 0.38, 0.14), (0.62, 0.62, 0.62), (0.9, 0.89, 0.86)])
_EYES = np.array([(0.36, 0.22, 0.1), (0.2, 0.12, 0.06), (0.25, 0.48, 0.78), (0.3, 0.58, 0.35),
                  (0.5, 0.56, 0.6), (0.52, 0.42, 0.18)])
_FRAMES = np.array([(0.05, 0.05, 0.05), (0.4, 0.24, 0.1), (0.75, 0.1, 0.12), (0.15, 0.25, 0.7),
                    (0.8, 0.65, 0.2)])

SPLIT_CODES = {"train": 0, "heldout": 1, "scenes": 2, "pairs": 3, "validation": 4}


def rng_for(seed: int, split: str, index: int, *extra: int) -> np.random.Generator:
    """The generator of one identity (``extra`` empty) or of one of its images / scenes."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    if int(seed) < 0 or int(index) < 0:
        raise ValueError(f"seed and index must be non-negative integers, got seed={seed!r}, index={index!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_CODES[split], int(index), *extra]))


#: the folder-name prefix of each split's identities
NAME_PREFIX = {"train": "id", "heldout": "ho", "validation": "va"}


def identity_name(split: str, index: int) -> str:
    if split not in NAME_PREFIX:
        raise ValueError(f"identity split must be one of {sorted(NAME_PREFIX)}, got {split!r}")
    return f"{NAME_PREFIX[split]}{index:05d}"


def image_name(expression: str, pose: str) -> str:
    return f"{expression}_{pose}"


def _colour(rng: np.random.Generator, palette: np.ndarray, jitter: float) -> tuple[float, float, float]:
    """A random blend of two neighbouring palette entries plus a little per-channel jitter."""
    pos = rng.uniform(0, len(palette) - 1)
    i = int(math.floor(pos))
    j = min(i + 1, len(palette) - 1)
    frac = pos - i if rng.uniform() < 0.5 else 0.0  # half of the time a pure palette colour (plus jitter)
    c = ((1 - frac) * palette[i] + frac * palette[j]) * rng.uniform(0.95, 1.05) + rng.uniform(-jitter, jitter, 3)
    return tuple(float(v) for v in np.clip(c, 0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class Identity:
    """Every parameter that makes one SynthFace person (constant across their 35 images)."""

    head_width: float      # W: half-width of the head (face units)
    head_height: float     # half-height
    squareness: float      # superellipse exponent of the outline (2 = ellipse)
    chin_taper: float      # narrowing of the lower face
    depth_ratio: float     # head depth / width (how strongly yaw moves the features)
    eye_y: float           # eye line, head frame
    eye_spacing: float     # half distance between eye centres
    eye_size: float        # eye half-width
    eye_aspect: float      # eye half-height / half-width
    eye_tilt: float        # outer corners up (+) or down (-)
    iris_ratio: float      # iris radius / eye half-width
    brow_gap: float        # eye centre → brow
    brow_thickness: float
    brow_length: float     # brow half-length / eye half-width
    brow_arch: float
    nose_length: float     # eye line → nose tip
    nose_width: float      # half-width of the nose wings
    nose_depth: float      # tip protrusion
    mouth_gap: float       # nose tip → mouth line
    mouth_width: float     # half-width
    upper_lip: float       # lip thicknesses
    lower_lip: float
    sneer_side: float      # +1 / -1: the side the upper lip lifts on in "disgusted"
    skin: tuple[float, float, float]
    lips: tuple[float, float, float]
    hair: tuple[float, float, float]
    eyes: tuple[float, float, float]
    hair_style: str
    hairline: float        # hairline height jitter (multiplies the style's forehead height)
    hair_volume: float     # hair thickness outside the head outline
    part_side: float       # +1 / -1
    glasses: str
    glasses_colour: tuple[float, float, float]
    glasses_size: float

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Identity:
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(names - set(d)), sorted(set(d) - names)
        if missing or unknown:
            raise ValueError(f"identity parameters: missing {missing}, unknown {unknown}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

def sample_identity(seed: int, split: str, index: int) -> Identity:
    """The identity ``index`` of ``split`` for dataset ``seed``."""
    rng = rng_for(seed, split, index)
    u = rng.uniform
    skin = _colour(rng, _SKIN, 0.02)
    lip_tint = np.array([0.78, 0.22, 0.28]) + rng.uniform(-0.06, 0.06, 3)
    lips = tuple(float(v) for v in np.clip(0.3 * np.array(skin) + 0.7 * lip_tint, 0, 1))
    head_height = u(1.2, 1.42)
    eye_y = u(-0.1, 0.03)
    nose_length = u(0.3, 0.42)
    mouth_gap = u(0.2, 0.28)
    style = HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))]
    glasses = GLASSES[0] if u() < 0.7 else GLASSES[1 + int(rng.integers(2))]
    return Identity(
        head_width=u(0.9, 1.08), head_height=head_height, squareness=u(2.0, 2.9), chin_taper=u(0.0, 0.32),
        depth_ratio=u(0.85, 0.97), eye_y=eye_y, eye_spacing=u(0.34, 0.46), eye_size=u(0.18, 0.25),
        eye_aspect=u(0.45, 0.66), eye_tilt=u(-0.03, 0.05), iris_ratio=u(0.48, 0.62), brow_gap=u(0.2, 0.29),
        brow_thickness=u(0.05, 0.1), brow_length=u(1.05, 1.4), brow_arch=u(0.0, 0.08),
        nose_length=nose_length, nose_width=u(0.1, 0.17), nose_depth=u(0.2, 0.35), mouth_gap=mouth_gap,
        mouth_width=u(0.26, 0.36), upper_lip=u(0.035, 0.07), lower_lip=u(0.05, 0.09),
        sneer_side=float(rng.choice([-1.0, 1.0])),
        skin=skin, lips=lips, hair=_colour(rng, _HAIR, 0.03), eyes=_colour(rng, _EYES, 0.03),
        hair_style=style, hairline=u(0.9, 1.1), hair_volume=u(0.06, 0.14) if style != "curly" else u(0.22, 0.34),
        part_side=float(rng.choice([-1.0, 1.0])), glasses=glasses, glasses_colour=_colour(rng, _FRAMES, 0.02),
        glasses_size=u(1.35, 1.6),
    )


@dataclasses.dataclass(frozen=True)
class SceneAttributes:
    """What a caption names: background colour, clothing colour, placement in the frame."""

    background: str
    clothing: str
    placement: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def sample_scene(rng: np.random.Generator) -> SceneAttributes:
    """Background and clothing differ by name (so the clothing is always visible against the background)."""
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    choices = [c for c in CLOTHING if c != background]
    clothing = choices[int(rng.integers(len(choices)))]
    placement = PLACEMENTS[int(rng.integers(len(PLACEMENTS)))]
    return SceneAttributes(background, clothing, placement)


@dataclasses.dataclass(frozen=True)
class ImageVariation:
    """Per-image nuisance parameters (small, so the 7 × 5 grid labels stay exact)."""

    yaw_jitter: float        # degrees, added to the pose's yaw
    roll: float              # degrees
    scale: float             # multiplies the nominal head size
    dx: float                # centre offsets, fractions of the image size
    dy: float
    intensity: float         # expression strength
    light: float             # global brightness factor
    background_shade: float  # vertical background gradient strength

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def sample_variation(rng: np.random.Generator) -> ImageVariation:
    u = rng.uniform
    return ImageVariation(yaw_jitter=u(-3, 3), roll=u(-4, 4), scale=u(0.93, 1.07), dx=u(-0.025, 0.025),
                          dy=u(-0.025, 0.025), intensity=u(0.85, 1.15), light=u(0.94, 1.06),
                          background_shade=u(-0.1, 0.1))
