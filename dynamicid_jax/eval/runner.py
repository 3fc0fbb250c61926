"""Running identity methods over a list of generation requests — the part of an evaluation suite that does not
depend on where the references and prompts come from (the SynthFace suite of the demo world and ``infer.eval
--suite real`` share it).

**Methods**: ``dynamicid`` (SAA + IMR), ``no-saa`` (same weights, ``activate_query=False``), ``no-imr`` (same
weights; requests only in the text prompt), ``base`` (the SD base's own text-to-image, no identity: the
generated-image chance level), ``infinite-id`` (two references are mixed, it has no layout) and
``infinite-id-no-adain`` (AdaIN-mean off). A :class:`Request` is one generation call; :func:`run_method` runs a
method over requests, :func:`preview_grids` lays the outputs out for a report.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["METHODS", "INFINITE_ID_METHODS", "DYNAMICID_METHODS", "Request", "load_pipelines", "generate",
           "run_method", "preview_grids"]

METHODS = ("dynamicid", "no-saa", "no-imr", "base", "infinite-id", "infinite-id-no-adain")
INFINITE_ID_METHODS = ("infinite-id", "infinite-id-no-adain")
DYNAMICID_METHODS = ("dynamicid", "no-saa", "no-imr")


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation call: ``len(prompts)`` images showing the references ``refs`` (indices into the suite's
    reference list). ``face_prompt``: the IMR request of the (single) identity; ``expression`` / ``pose``: the
    requested labels; ``attributes``: per prompt, what it names (``background``, ``clothing`` — a list for
    multi-ID —, ``placement``); ``boxes``: normalised layout boxes, one per reference (multi-ID);
    ``boost_steps``: the length of SAA's layout boost for the DynamicID methods (``None``: the pipeline's
    default, :func:`dynamicid_jax.pipelines.dynamicid.default_boost`; 0: the gate and routing only)."""

    kind: str
    refs: tuple[int, ...]
    prompts: tuple[str, ...]
    seed: int
    height: int
    width: int
    face_prompt: str | None = None
    expression: str | None = None
    pose: str | None = None
    attributes: tuple[dict, ...] = ()
    boxes: tuple[tuple[float, ...], ...] | None = None
    group: int = 0  # the edit identity a control / edit belongs to
    boost_steps: int | None = None


# ---------------------------------------------------------------------------------------------- the methods
def load_pipelines(methods: Sequence[str], sd_path: str, *, dynamicid_path: str | None = None,
                   infinite_id_path: str | None = None, analyzer: Any = "insightface",
                   analyzer_kwargs: dict | None = None, dynamicid_image_encoder: str | None = None,
                   infinite_id_image_encoder: str | None = None) -> dict[str, Any]:
    """``{"sd": StableDiffusion, "dynamicid": DynamicIDPipeline, "infinite-id": InfiniteIDPipeline}`` as far as
    ``methods`` need them (one SD base, loaded once; ``"sd"`` is always there: the ``base`` method and the VAE
    round trip use it). Missing weights for a requested method → ``ValueError`` naming the option."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    need_did = any(m in DYNAMICID_METHODS for m in methods)
    need_iid = any(m in INFINITE_ID_METHODS for m in methods)
    if need_did and not dynamicid_path:
        raise ValueError(f"methods {[m for m in methods if m in DYNAMICID_METHODS]} need the DynamicID "
                         "weights (--dynamicid DIR)")
    if need_iid and not infinite_id_path:
        raise ValueError(f"methods {[m for m in methods if m in INFINITE_ID_METHODS]} need the Infinite-ID weights "
                         "(--infinite-id DIR)")
    for what, path in (("SD base", sd_path), ("DynamicID", dynamicid_path if need_did else None),
                       ("Infinite-ID", infinite_id_path if need_iid else None)):
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"{what} weights {path!r} do not exist")
    from dynamicid_jax.faces import get_analyzer
    from dynamicid_jax.pipelines.stable_diffusion import StableDiffusion

    if isinstance(analyzer, str):
        analyzer = get_analyzer(analyzer, **(analyzer_kwargs or {}))
    sd = StableDiffusion.from_pretrained(sd_path, scheduler="ddim")
    pipes: dict[str, Any] = {"sd": sd}
    if need_did:
        from dynamicid_jax.models.clip import load_image_encoder
        from dynamicid_jax.pipelines.dynamicid import DynamicIDPipeline, load_dynamicid

        encoder = dynamicid_image_encoder or os.path.join(dynamicid_path, "image_encoder")
        if not os.path.isdir(encoder):
            raise ValueError(f"no CLIP vision tower for DynamicID: {encoder!r} does not exist (give the image "
                             "encoder folder)")
        vision, vision_params = load_image_encoder(encoder)
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*-point analyzer.*")
            pipes["dynamicid"] = DynamicIDPipeline.from_weights(sd, load_dynamicid(dynamicid_path), vision,
                                                                vision_params, analyzer)
    if need_iid:
        from dynamicid_jax.pipelines.infinite_id import InfiniteIDPipeline

        encoder = infinite_id_image_encoder or os.path.join(infinite_id_path, "image_encoder")
        if not os.path.isdir(encoder):
            raise ValueError(f"no CLIP vision tower for Infinite-ID: {encoder!r} does not exist (give the image "
                             "encoder folder)")
        pipes["infinite-id"] = InfiniteIDPipeline.from_pretrained(sd, infinite_id_path, encoder,
                                                                  face_analyzer=analyzer)
    return pipes


def generate(method: str, pipes: dict[str, Any], request: Request, references: Sequence[np.ndarray], *,
             steps: int, guidance_scale: float, id_scale: float = 1.0) -> np.ndarray:
    """The images of one request by one method → ``uint8 [len(prompts), H, W, 3]``. ``id_scale`` scales the ID
    tokens' attention output of the DynamicID methods (``DynamicIDPipeline(..., id_scale=)``; 1: the method's
    own); the other methods have no such knob."""
    refs = [references[i] for i in request.refs]
    common = dict(steps=steps, guidance_scale=guidance_scale, seed=request.seed, height=request.height,
                  width=request.width)
    prompts = list(request.prompts)
    if method in INFINITE_ID_METHODS:
        if "infinite-id" not in pipes:
            raise ValueError(f"method {method} needs an Infinite-ID pipeline (pipes['infinite-id'])")
        return pipes["infinite-id"](prompts, references=refs, adain=method == "infinite-id", **common)
    if method == "base":  # the base's own text-to-image: same prompts and seeds, no identity
        if "sd" not in pipes:
            raise ValueError("method base needs the SD base (pipes['sd'])")
        return pipes["sd"].generate(prompts, **common)
    if method not in DYNAMICID_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if "dynamicid" not in pipes:
        raise ValueError(f"method {method} needs a DynamicID pipeline (pipes['dynamicid'])")
    face_prompts = [request.face_prompt] if request.face_prompt and method != "no-imr" else None
    return pipes["dynamicid"](prompts, refs, face_prompts=face_prompts, layout="row",
                              activate_query=method != "no-saa", boost_steps=request.boost_steps,
                              id_scale=id_scale, **common)


def run_method(method: str, pipes: dict[str, Any], requests: Sequence[Request], references: Sequence[np.ndarray],
               *, steps: int, guidance_scale: float, id_scale: float = 1.0,
               reuse: dict[int, np.ndarray] | None = None,
               progress: bool = False) -> tuple[list[tuple[Request, np.ndarray]], float]:
    """``[(request, images)]`` in request order and the generation seconds. ``reuse``: request index → images
    already generated for it (w/o IMR: DynamicID's single, multi and control images, which it would draw
    identically)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out = []
    for k, r in enumerate(tqdm(requests, desc=f"eval {method}", unit="call", disable=not progress, leave=False)):
        images = None if reuse is None else reuse.get(k)
        if images is None:
            images = generate(method, pipes, r, references, steps=steps, guidance_scale=guidance_scale,
                              id_scale=id_scale)
        out.append((r, images))
    return out, time.perf_counter() - start


def _enlarge(images: np.ndarray, k: int = 2) -> np.ndarray:
    return np.repeat(np.repeat(np.asarray(images, np.uint8), k, axis=-3), k, axis=-2)


def preview_grids(outputs: Sequence[tuple[Request, np.ndarray]], references: Sequence[np.ndarray], *,
                  max_columns: int = 9) -> dict[str, np.ndarray]:
    """``{"single"|"multi"|"edit": uint8 grid}``: a row per identity (pair) — reference(s), then its images (at
    most ``max_columns`` panels); the edit row is reference, unedited control, then the first image of each
    edit."""
    from dynamicid_jax.file_io import image_grid

    def panel(refs, shape):  # the references side by side, resized to one generated image's size
        h, w = shape[:2]
        edges = np.linspace(0, w, len(refs) + 1).round().astype(int)
        return np.concatenate([np.asarray(Image.fromarray(np.asarray(references[i], np.uint8)).resize(
            (int(edges[k + 1] - edges[k]), h), Image.Resampling.BICUBIC)) for k, i in enumerate(refs)], axis=1)

    rows: dict[str, dict[Any, list]] = {"single": {}, "multi": {}, "edit": {}}
    first_seed: dict[int, int] = {}
    for r, images in outputs:
        if r.kind in ("single", "multi"):
            row = rows[r.kind].setdefault(r.refs, [panel(r.refs, images[0].shape)])
            row.extend(list(images)[:max(0, max_columns - len(row))])
        elif first_seed.setdefault(r.group, r.seed) == r.seed:  # one image per edit: the first seed's
            rows["edit"].setdefault(r.group, [panel(r.refs, images[0].shape)]).append(images[0])
    grids = {}
    for kind, by_row in rows.items():
        if not by_row:
            continue
        cols = max(len(v) for v in by_row.values())
        panels = []
        for v in by_row.values():
            panels += v + [np.full_like(v[0], 255)] * (cols - len(v))
        stack = np.stack(panels)
        grids[kind] = image_grid(_enlarge(stack) if stack.shape[1] < 128 else stack, columns=cols)
    return grids
