"""SynthFace: the demo's procedural face world, in which every stage of DynamicID trains for real on a CPU — an app
package of its own that plugs into the library through its public registries (:mod:`.plugin`: the ``synthetic``
face-analysis backend, the ``synthface`` evaluation suite), as a user's own world would.

* The world: ``python -m synthface --out DIR --identities N --seed S`` writes N identities × 35 images
  (7 expressions × 5 poses) with captions and exact face values, held-out identities and multi-person scenes
  (:mod:`.dataset`). Rendering is pure numpy (:mod:`.raster`, :mod:`.render`) from one 2.5D head geometry
  (:mod:`.face_model`) whose random parameters live in :mod:`.world`.
* Its face models: ``python -m synthface.train_models`` trains them (:mod:`.faces`: recogniser, detector,
  landmarks; :mod:`.evaluation`: the evaluation recogniser and attribute classifiers) on such a tree.
* Its evaluation suite (:mod:`.evaluation.suite`), stage 0 — the tiny SD base trained from scratch
  (``python -m synthface.stage0``) — and the demo orchestration (``python -m synthface.demo``, ``make demo``;
  ``python -m synthface.demo_base``, ``make base``).
"""
from .dataset import (
                      SCHEMA,
                      caption_for,
                      generate,
                      group_caption,
                      list_images,
                      load_index,
                      load_pairs,
                      load_split,
                      read_record,
                      render_identity,
                      render_scene,
                      write_identity,
                      write_scene,
)
from .face_model import EXPRESSION_SHAPES, FaceLayout, Pose2D, face_layout
from .render import draw_person, render_group, render_portrait
from .world import (
                      BACKGROUNDS,
                      CLOTHING,
                      EXPRESSIONS,
                      PLACEMENTS,
                      POSE_YAW,
                      POSES,
                      PROMPT_EXPRESSION,
                      Identity,
                      SceneAttributes,
                      sample_identity,
)
from . import plugin  # registers the synthetic backend and the synthface suite

__all__ = [
    "SCHEMA", "generate", "load_index", "list_images", "load_split", "load_pairs", "group_caption", "read_record", "render_identity",
    "render_scene", "write_identity", "write_scene", "caption_for", "face_layout", "FaceLayout", "Pose2D",
    "EXPRESSION_SHAPES", "render_portrait", "render_group", "draw_person", "EXPRESSIONS", "POSES", "POSE_YAW",
    "PROMPT_EXPRESSION", "BACKGROUNDS", "CLOTHING", "PLACEMENTS", "Identity", "SceneAttributes", "sample_identity",
]
