"""Which models the web app serves: the embedded SynthFace world that ``make demo`` trains, or real weights.

All the embedded world's paths live here (:data:`EMBEDDED`), relative to the demo's output folder.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from typing import Any

from infer.app_engine import CachingAnalyzer, Models

#: The folder ``make demo`` writes, and the command that writes it.
DEFAULT_DEMO_DIR = "demo_out"
DEMO_COMMAND = "make demo"


@dataclasses.dataclass(frozen=True)
class EmbeddedWorld:
    """Where the demo leaves each part, relative to its output folder."""

    stages: str = "work/stages.json"  # the base the demo used: the shipped one, or one it trained (its stage0 record)
    dynamicid: str = "work/dynamicid"
    face_models: str = "work/face_models"
    synthface: str = "work/synthface"
    infinite_id: str = "work/infinite_id/export"  # only after `python -m synthface.demo --infinite-id`
    examples: int = 4  # held-out SynthFace faces offered as example references


EMBEDDED = EmbeddedWorld()


class MissingModelsError(FileNotFoundError):
    """The models to serve are not there (the message says how to make them)."""


@dataclasses.dataclass
class ModelSpec:
    """Paths of the models to serve (see ``python -m infer.app --help``)."""

    sd: str
    dynamicid: str
    clip_vision: str | None = None  # default: DYNAMICID/image_encoder
    analyzer: str = "insightface"
    analyzer_kwargs: dict = dataclasses.field(default_factory=dict)
    infinite_id: str | None = None
    infinite_id_clip_vision: str | None = None  # default: INFINITE_ID/image_encoder
    examples: list[str] = dataclasses.field(default_factory=list)
    description: str = ""


def embedded_spec(demo_dir: str = DEFAULT_DEMO_DIR) -> ModelSpec:
    """The SynthFace models ``make demo`` trained into ``demo_dir``; :class:`MissingModelsError` naming the command
    that makes them when any part is missing."""
    paths = {name: os.path.join(demo_dir, rel) for name, rel in
             (("dynamicid", EMBEDDED.dynamicid), ("face_models", EMBEDDED.face_models),
              ("synthface", EMBEDDED.synthface))}
    paths["sd"] = _demo_base(demo_dir)
    missing = [p for p in paths.values() if not os.path.isdir(p)]
    if missing:
        raise MissingModelsError(
            f"the embedded SynthFace models are not in {os.path.abspath(demo_dir)}/ (missing {', '.join(missing)}); "
            f"run `{DEMO_COMMAND}` first (13–18 minutes on a 2-core CPU), or pass --sd/--dynamicid for real weights")
    iid = os.path.join(demo_dir, EMBEDDED.infinite_id)
    return ModelSpec(sd=paths["sd"], dynamicid=paths["dynamicid"], analyzer="synthetic",
                     analyzer_kwargs={"models_dir": paths["face_models"]},
                     infinite_id=iid if os.path.isdir(iid) else None,
                     examples=synthface_examples(paths["synthface"], EMBEDDED.examples),
                     description=f"the embedded SynthFace world trained by `{DEMO_COMMAND}` ({demo_dir}/)")


def _demo_base(demo_dir: str) -> str:
    """The Stable Diffusion base the demo trained on (recorded by its base stage), else the shipped base
    (``assets/synthface_base``, the demo world's ``synthface.demo_base.ASSET_DIR``: named here, not imported, since the
    app may not import the world)."""
    import json

    try:
        with open(os.path.join(demo_dir, EMBEDDED.stages), encoding="utf-8") as f:
            return json.load(f)["stage0"]["result"]["sd"]
    except (OSError, ValueError, KeyError, TypeError):
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "synthface_base")


def synthface_examples(data_dir: str, count: int) -> list[str]:
    """Neutral frontal images of the first ``count`` held-out SynthFace identities (never seen in training)."""
    heldout = os.path.join(data_dir, "heldout")
    if not os.path.isdir(heldout):
        return []
    out = []
    for name in sorted(os.listdir(heldout)):
        path = os.path.join(heldout, name, "neutral_front.png")
        if os.path.isfile(path):
            out.append(path)
        if len(out) == count:
            break
    return out


def load_models(spec: ModelSpec, *, analyzer: Any = None) -> Models:
    """Load the pipelines of ``spec`` (``analyzer``: an analyzer object to use instead of ``spec.analyzer``)."""
    from dynamicid_jax.faces import get_analyzer
    from dynamicid_jax.pipelines.dynamicid import DynamicIDPipeline

    for what, path in (("--sd", spec.sd), ("--dynamicid", spec.dynamicid), ("--clip-vision", spec.clip_vision),
                       ("--infinite-id", spec.infinite_id)):
        if path is not None and not os.path.exists(path):
            raise MissingModelsError(f"{what} {path}: no such file or folder")
    face = CachingAnalyzer(analyzer if analyzer is not None else get_analyzer(spec.analyzer, **spec.analyzer_kwargs))
    print(f"loading {spec.sd} + DynamicID {spec.dynamicid} (analyzer: {spec.analyzer}) …", file=sys.stderr,
          flush=True)
    with warnings.catch_warnings():  # a 68-point analyzer's rasters (dlib, SynthFace) are a known, stated limit
        warnings.filterwarnings("ignore", message="the IMR's landmark rasters come from")
        pipe = DynamicIDPipeline.from_pretrained(spec.sd, spec.dynamicid, analyzer=face,
                                                 clip_vision_path=spec.clip_vision)
    infinite = None
    if spec.infinite_id:
        from dynamicid_jax.pipelines.infinite_id import InfiniteIDPipeline

        encoder = spec.infinite_id_clip_vision or os.path.join(spec.infinite_id, "image_encoder")
        print(f"loading Infinite-ID {spec.infinite_id} …", file=sys.stderr, flush=True)
        infinite = InfiniteIDPipeline.from_pretrained(pipe.sd, spec.infinite_id, encoder, face_analyzer=face)
    return Models(pipe, infinite, list(spec.examples), spec.description)
