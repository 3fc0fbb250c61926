"""The KDEF-style grid vocabulary of docs/method.md §6.2: 7 expressions × 5 head poses, and the grid prompt
``"the expression is {e}, the face is {p}"`` the IMR is trained with beside the automatic face prompt.

:func:`grid_face_prompt` gives the grid prompt of any face from its expression label and pose (the data loaders
use it); worlds that render the grid (the SynthFace demo world) use the same words, so a rendered sidecar's
``grid_prompt`` and the loader's agree.
"""
from __future__ import annotations

import numpy as np

__all__ = ["EXPRESSIONS", "POSES", "POSE_YAW", "PROMPT_EXPRESSION", "POSE_PHRASE", "grid_prompt", "grid_face_prompt"]

#: the 7 expressions of the grid (the KDEF words)
EXPRESSIONS = ("neutral", "happy", "sad", "surprised", "angry", "disgusted", "afraid")
#: pose names are in image terms: "left" = facing the image's left (yaw < 0)
POSES = ("left", "slight-left", "front", "slight-right", "right")
POSE_YAW = {"left": -50.0, "slight-left": -25.0, "front": 0.0, "slight-right": 25.0, "right": 50.0}
#: grid expression → the label the automatic face prompt uses (docs/method.md §5; ``faces.EXPRESSIONS``)
PROMPT_EXPRESSION = {"neutral": "neutral", "happy": "happy", "sad": "sad", "surprised": "surprise",
                     "angry": "anger", "disgusted": "disgust", "afraid": "fear"}
#: pose → the phrase of the grid prompt
POSE_PHRASE = {"left": "fully turned to the left", "slight-left": "slightly turned to the left",
               "front": "front view", "slight-right": "slightly turned to the right",
               "right": "fully turned to the right"}


def grid_prompt(expression: str, pose: str) -> str:
    """The grid prompt of docs/method.md §6.2 for a grid expression and pose name."""
    return f"the expression is {expression}, the face is {POSE_PHRASE[pose]}"


def grid_face_prompt(expression: str | None, pose) -> str | None:
    """The KDEF-style grid prompt ``"the expression is {e}, the face is {p}"`` (docs/method.md §6.2) of a face with an
    ``expression`` label (the analyzer vocabulary ``happy, surprise, …`` or SynthFace's ``surprised, …``) and a
    ``pose`` ``(pitch, yaw[, roll])``: the head turn is the nearest of the grid's five yaws (±50°, ±25°, 0°), as
    SynthFace's sidecars' ``grid_prompt`` says it. ``None`` when the expression is unknown."""
    if expression is None:
        return None
    names = {v: k for k, v in PROMPT_EXPRESSION.items()}
    name = expression if expression in EXPRESSIONS else names.get(expression)
    if name is None:
        return None
    yaw = float(np.asarray(pose, np.float64).reshape(-1)[1])
    pose_name = min(POSE_YAW, key=lambda p: abs(POSE_YAW[p] - yaw))
    return grid_prompt(name, pose_name)
