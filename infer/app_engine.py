"""The web app's engine, without any web code: models, one request → images, field-located errors, the queue.

:class:`Engine` holds the loaded pipelines and serves :meth:`Engine.generate`, which the Gradio page
(:mod:`infer.app`) and its API endpoint both call. It is usable on its own::

    engine = Engine(load_models(ModelSpec(sd="sd15/", dynamicid="dynamicid/", clip_vision="clip-h/",
                                          analyzer="insightface")))
    result = engine.generate(Request(prompt="two friends at the beach", references=[alice, bob]))

* **Errors name their field.** Every input is checked before sampling, in the order the page shows them; a
  failure raises :class:`FieldError` with the field (``"reference_2"``, ``"boxes"``, ``"size"``, …, see
  :data:`FIELDS`) and a one-line message. Face analysis runs per reference here, so a missing or doubled face is
  pinned to its slot rather than parsed out of a pipeline message.
* **One sampler at a time, a bounded queue.** At most ``max_queue`` requests are admitted (running + waiting);
  one more gets :class:`BusyError` at once instead of waiting without end. Admitted requests take turns on one
  lock, so a device only ever runs one sampler.
* **Compiled programs are reused.** The pipelines keep one compiled sampler per shape; the engine remembers which
  shapes it has run so the first request of a shape can say it is compiling (:attr:`Result.compiled`).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import math
import threading
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from dynamicid_jax import faces as F

LOG = logging.getLogger("infer.app")

MAX_REFERENCES = 4
METHODS = ("DynamicID", "Infinite-ID", "plain SD")
LAYOUTS = ("row", "grid", "boxes")
SCHEDULERS = ("ddim", "dpm++2m", "euler")
MAX_STEPS = 200
#: Every field an error can point at (the page shows each message next to that field).
FIELDS = ("prompt", "negative_prompt", *(f"reference_{i}" for i in range(1, MAX_REFERENCES + 1)),
          *(f"face_prompt_{i}" for i in range(1, MAX_REFERENCES + 1)), "references", "layout", "boxes",
          "id_scale", "steps", "guidance", "seed", "size", "scheduler", "method", "general")


class FieldError(ValueError):
    """A request input the app or a pipeline refused; ``field`` is one of :data:`FIELDS`."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class BusyError(RuntimeError):
    """The queue is full (``max_queue`` requests running or waiting)."""


@dataclasses.dataclass
class Request:
    """One generation request; ``references`` / ``face_prompts`` are per slot (``None`` / empty = unused)."""

    prompt: str
    references: Sequence[Any] = ()
    face_prompts: Sequence[str | None] = ()
    negative_prompt: str = ""
    method: str = "DynamicID"
    layout: str = "row"
    boxes: str = ""  # "y0,x0,y1,x1; …" normalised, one box per reference (layout "boxes")
    id_scale: float = 1.0
    steps: int = 25
    guidance: float = 5.0
    seed: int = 0
    height: int | None = None  # None: the model's native size
    width: int | None = None
    scheduler: str = "ddim"


@dataclasses.dataclass
class ReferenceFace:
    slot: int  # 1-based slot on the page
    image: np.ndarray  # RGB uint8
    face: Any  # dynamicid_jax.faces.Face
    source_prompt: str  # the automatic IMR source prompt from the face's pose


@dataclasses.dataclass
class Result:
    image: np.ndarray  # uint8 [H, W, 3]
    gate_overlays: list[tuple[np.ndarray, str]]  # one per identity (DynamicID only)
    faces: list[ReferenceFace]
    compiled: bool  # this request compiled a new sampler
    seconds: dict[str, float]
    status: str


class CachingAnalyzer:
    """A face analyzer that remembers the last ``size`` images' results (the pipeline analyses each reference
    again, and a page is usually re-run with the same references). Analyses run one at a time: the backends
    (dlib, onnxruntime sessions) are not documented as safe to call from several request threads at once."""

    def __init__(self, inner: Any, size: int = 32):
        self.inner, self.embedding_dim, self.num_landmarks = inner, inner.embedding_dim, inner.num_landmarks
        self._cache: collections.OrderedDict[str, list] = collections.OrderedDict()
        self._size, self._lock, self._busy = size, threading.Lock(), threading.Lock()

    def analyze(self, image: Any) -> list:
        rgb = F.load_rgb(image)
        key = hashlib.sha1(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return list(self._cache[key])
        with self._busy:
            faces = self.inner.analyze(rgb)
        with self._lock:
            self._cache[key] = list(faces)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return list(faces)


@dataclasses.dataclass
class Models:
    """The loaded pipelines: DynamicID (always), Infinite-ID (optional); plain SD is DynamicID's base."""

    dynamicid: Any  # DynamicIDPipeline
    infinite_id: Any = None  # InfiniteIDPipeline
    examples: list[str] = dataclasses.field(default_factory=list)  # reference images offered on the page
    description: str = ""


def parse_boxes(text: str) -> list[list[float]] | None:
    """``"y0,x0,y1,x1; y0,x0,y1,x1"`` → ``[[y0, x0, y1, x1], …]`` (``None`` for empty text)."""
    text = (text or "").strip()
    if not text:
        return None
    boxes = []
    for i, part in enumerate(p for p in text.replace("\n", ";").split(";") if p.strip()):
        try:
            values = [float(v) for v in part.replace(" ", ",").split(",") if v.strip()]
        except ValueError:
            raise FieldError("boxes", f"box {i + 1} ({part.strip()!r}) is not four numbers y0,x0,y1,x1") from None
        if len(values) != 4:
            raise FieldError("boxes", f"box {i + 1} has {len(values)} numbers, expected four: y0,x0,y1,x1")
        boxes.append(values)
    return boxes


def format_boxes(boxes: Sequence[Sequence[float]]) -> str:
    return "; ".join(",".join(f"{v:.2f}" for v in b) for b in boxes)


def boxes_from_drawing(rgba: np.ndarray | None, colours: Sequence[Sequence[int]], *,
                       tolerance: float = 60.0) -> list[list[float]]:
    """Boxes drawn on the layout canvas: for identity ``i``, the bounding box (normalised ``[y0, x0, y1, x1]``) of
    the pixels painted in ``colours[i]``; stops at the first identity with no stroke."""
    if rgba is None:
        return []
    img = np.asarray(rgba)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        return []
    rgb = img[..., :3].astype(np.float32)
    painted = img[..., 3] > 0 if img.shape[-1] == 4 else np.ones(img.shape[:2], bool)
    height, width = img.shape[:2]
    boxes = []
    for colour in colours:
        mask = painted & (np.linalg.norm(rgb - np.asarray(colour, np.float32), axis=-1) < tolerance)
        if mask.sum() < 4:
            break
        ys, xs = np.nonzero(mask)
        boxes.append([ys.min() / height, xs.min() / width, (ys.max() + 1) / height, (xs.max() + 1) / width])
    return boxes


class Engine:
    """Serves :meth:`generate` for one :class:`Models` (see the module docstring)."""

    def __init__(self, models: Models, *, max_queue: int = 8, max_side: int | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.models = models
        self.max_queue = max_queue
        self._admission = threading.Lock()
        self._sampler = threading.Lock()  # one sampler at a time on this device
        self.pending = 0  # admitted requests (running + waiting)
        self._variants: dict[tuple[str, str], Any] = {}
        self._seen_shapes: set[tuple] = set()
        sd = models.dynamicid.sd
        self.size_multiple = sd.size_multiple()
        self.native_size = int(sd.unet.config.sample_size) * sd.vae_scale_factor
        self.max_side = max_side or max(1024, self.native_size)
        self.methods = [m for m in METHODS if m != "Infinite-ID" or models.infinite_id is not None]
        self.has_imr = models.dynamicid.imr is not None

    # ------------------------------------------------------------------------------------------------ queue
    def generate(self, request: Request, progress: Callable[[str], None] | None = None) -> Result:
        """Check ``request`` (:class:`FieldError`), wait for the sampler (:class:`BusyError` when the queue is
        full) and generate. ``progress(message)`` is called at each phase."""
        say = progress or (lambda message: None)
        with self._admission:
            if self.pending >= self.max_queue:
                raise BusyError(f"busy: {self.pending} requests are already queued (the limit is {self.max_queue});"
                                f" please try again in a minute")
            self.pending += 1
            ahead = self.pending - 1
        try:
            checked = self._check(request)
            if ahead:
                say(f"waiting for the sampler ({ahead} request(s) ahead)")
            with self._sampler:
                return self._run(checked, say)
        finally:
            with self._admission:
                self.pending -= 1

    # ------------------------------------------------------------------------------------------------ checks
    def _check(self, r: Request) -> dict:
        if r.method not in self.methods:
            raise FieldError("method", f"must be one of {', '.join(self.methods)}, got {r.method!r}"
                             + (" (Infinite-ID needs --infinite-id weights)" if r.method == "Infinite-ID" else ""))
        if not isinstance(r.prompt, str) or not r.prompt.strip():
            raise FieldError("prompt", "write a prompt describing the image")
        if r.negative_prompt is not None and not isinstance(r.negative_prompt, str):
            raise FieldError("negative_prompt", "must be text")
        references = list(r.references or ())
        if len(references) > MAX_REFERENCES:
            raise FieldError("references", f"{len(references)} references given; the app takes one to "
                                           f"{MAX_REFERENCES} (one per person)")
        face_prompts = [(p or "").strip() or None for p in (r.face_prompts or ())]
        if len(face_prompts) > MAX_REFERENCES:
            raise FieldError("references", f"{len(face_prompts)} face prompts given; at most {MAX_REFERENCES}")
        face_prompts += [None] * (MAX_REFERENCES - len(face_prompts))
        references += [None] * (MAX_REFERENCES - len(references))
        used = [i for i, ref in enumerate(references) if ref is not None]
        for i, p in enumerate(face_prompts):
            if p is None:
                continue
            if references[i] is None:
                raise FieldError(f"face_prompt_{i + 1}", f"there is no reference photo in slot {i + 1} to edit")
            if r.method != "DynamicID":
                raise FieldError(f"face_prompt_{i + 1}", f"face prompts are a DynamicID feature (the IMR); clear "
                                                         f"it or choose DynamicID (method is {r.method})")
            if not self.has_imr:
                raise FieldError(f"face_prompt_{i + 1}", "this DynamicID folder has no IMR, so it cannot edit "
                                                         "expressions (convert it with --imr IMR.bin)")
        if r.method != "plain SD" and not used:
            raise FieldError("references", f"add at least one reference photo ({r.method} personalises people)")
        height = self.native_size if r.height in (None, 0) else r.height
        width = self.native_size if r.width in (None, 0) else r.width
        for name, value in (("height", height), ("width", width)):
            if not _is_int(value) or value <= 0 or value % self.size_multiple or value > self.max_side:
                raise FieldError("size", f"{name} must be a multiple of {self.size_multiple} between "
                                         f"{self.size_multiple} and {self.max_side} px, got {value!r}")
        if not _is_int(r.steps) or not 1 <= r.steps <= MAX_STEPS:
            raise FieldError("steps", f"must be a whole number from 1 to {MAX_STEPS}, got {r.steps!r}")
        if not _finite(r.guidance) or r.guidance < 0:
            raise FieldError("guidance", f"must be a number ≥ 0 (1 or less turns guidance off), got {r.guidance!r}")
        if not _finite(r.id_scale) or not -10 <= r.id_scale <= 10:
            raise FieldError("id_scale", f"must be a number between -10 and 10, got {r.id_scale!r}")
        if not _is_int(r.seed) or not 0 <= r.seed < 2 ** 31:
            raise FieldError("seed", f"must be a whole number from 0 to 2^31 - 1, got {r.seed!r}")
        if r.scheduler not in SCHEDULERS:
            raise FieldError("scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {r.scheduler!r}")
        if r.layout not in LAYOUTS:
            raise FieldError("layout", f"must be one of {', '.join(LAYOUTS)}, got {r.layout!r}")
        faces = [self._analyse(references[i], i + 1) for i in used] if r.method != "plain SD" else []
        boxes = None
        if r.method == "DynamicID" and r.layout == "boxes":
            from dynamicid_jax.methods.saa import validate_boxes

            boxes = parse_boxes(r.boxes)
            if boxes is None:
                raise FieldError("boxes", f"draw or type one box per reference ({len(used)}), or pick the row or "
                                          f"grid layout")
            try:
                validate_boxes(boxes, len(used))
            except ValueError as err:
                raise FieldError("boxes", _boxes_message(str(err))) from None
        return dict(request=r, faces=faces, face_prompts=[face_prompts[i] for i in used], boxes=boxes,
                    height=int(height), width=int(width), steps=int(r.steps), seed=int(r.seed),
                    guidance=float(r.guidance), id_scale=float(r.id_scale))

    def _analyse(self, image: Any, slot: int) -> ReferenceFace:
        what = f"reference {slot}"
        try:
            rgb = F.load_rgb(image, what)
            faces = self.models.dynamicid.analyzer.analyze(rgb)
            face = F.select_reference(faces, strict=True, what=what)
        except F.MultipleFacesError:
            raise FieldError(f"reference_{slot}", f"{len(faces)} faces found; a reference must show one person — "
                                                  f"crop the photo to one face") from None
        except F.NoFaceError:
            raise FieldError(f"reference_{slot}", "no face found; use a photo with one clearly visible face") \
                from None
        except (ValueError, TypeError, OSError) as err:
            raise FieldError(f"reference_{slot}", _one_line(err)) from None
        return ReferenceFace(slot, rgb, face, F.auto_face_prompt(face.pose))

    # ------------------------------------------------------------------------------------------------ running
    def _variant(self, method: str, scheduler: str):
        """The pipeline for ``method`` sampling with ``scheduler`` (params shared; compiled programs per variant)."""
        key = (method, scheduler)
        if key in self._variants:
            return self._variants[key]
        from dynamicid_jax.schedulers import SCHEDULER_KINDS, load_scheduler

        base = self.models.dynamicid if method != "Infinite-ID" else self.models.infinite_id
        current = base.sd.scheduler
        if type(current) is SCHEDULER_KINDS[scheduler]:
            pipe = base
        else:
            sd = dataclasses.replace(base.sd, scheduler=load_scheduler(_scheduler_config(current), kind=scheduler),
                                     _compiled={}, last_timings={})
            extra = {"_fns": {}} if method != "Infinite-ID" else {"_cache": {}}
            pipe = dataclasses.replace(base, sd=sd, _compiled={}, last_timings={}, **extra)
        self._variants[key] = pipe
        return pipe

    def _run(self, c: dict, say: Callable[[str], None]) -> Result:
        r: Request = c["request"]
        pipe = self._variant("DynamicID" if r.method == "plain SD" else r.method, r.scheduler)
        n = len(c["faces"])
        mode = "mix" if c["boxes"] is not None and len(c["boxes"]) == 1 and n > 1 else "route"
        shape = (r.method, r.scheduler, c["height"], c["width"], c["steps"], c["guidance"] > 1.0, n, mode)
        compiling = shape not in self._seen_shapes
        what = f"{c['width']}×{c['height']}, {c['steps']} steps, {n} identit{'y' if n == 1 else 'ies'}"
        say(f"compiling the sampler for {what} (first request of this shape; later ones reuse it)…" if compiling
            else f"sampling {what} with the compiled sampler…")
        start = time.perf_counter()
        common = dict(negative_prompt=r.negative_prompt or None, steps=c["steps"], guidance_scale=c["guidance"],
                      seed=c["seed"], height=c["height"], width=c["width"])
        refs = [f.image for f in c["faces"]]
        gates = None
        try:
            if r.method == "plain SD":
                images = pipe.sd.generate([r.prompt], **common)
                timings = pipe.sd.last_timings
            elif r.method == "Infinite-ID":
                images = pipe(r.prompt, refs, id_scale=c["id_scale"], strict=True, **common)
                timings = pipe.last_timings
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    images, gates = pipe(r.prompt, refs, face_prompts=c["face_prompts"], boxes=c["boxes"],
                                         layout=r.layout if r.layout != "boxes" else "row", id_scale=c["id_scale"],
                                         return_gates=True, strict=True, **common)
                timings = pipe.last_timings
        except ValueError as err:  # a refusal the checks above did not foresee: still one line, never a trace
            LOG.warning("request refused by the pipeline: %s", err)
            raise FieldError("general", _one_line(err)) from None
        total = time.perf_counter() - start
        self._seen_shapes.add(shape)
        compiled = "compile_s" in timings
        seconds = {"total_s": total, **{k: float(v) for k, v in timings.items()}}
        status = (f"done in {total:.1f} s" + (f" (compiled the sampler in {timings['compile_s']:.1f} s, "
                                               f"sampled in {timings.get('run_s', 0.0):.1f} s)" if compiled
                                               else " (reused the compiled sampler)"))
        overlays = identity_overlays(gates, images[0]) if gates is not None else []
        return Result(np.asarray(images[0]), overlays, c["faces"], compiled, seconds, status)


def identity_overlays(gates: Any, image: np.ndarray, alpha: float = 0.65) -> list[tuple[np.ndarray, str]]:
    """Per identity: the image tinted in the identity's colour where its SAA gate (mean of all layers and steps)
    is large, with its box outlined — the "all layers" row of :func:`~dynamicid_jax.pipelines.gates.
    gate_overlay_image`, one picture per identity."""
    from PIL import Image, ImageDraw

    from dynamicid_jax.pipelines.gates import IDENTITY_COLOURS

    maps = gates.identity_maps(0)["all layers"]
    vmax = max(1.0, float(maps.max()))
    base = np.asarray(image, np.float32)
    height, width = base.shape[:2]
    out = []
    for i in range(gates.num_ids):
        colour = np.array(IDENTITY_COLOURS[i % len(IDENTITY_COLOURS)], np.float32)
        a = (alpha * np.clip(maps[i] / vmax, 0.0, 1.0))[..., None]
        tinted = Image.fromarray(np.clip(np.round(base * (1 - a) + colour * a), 0, 255).astype(np.uint8))
        if gates.activate_query and gates.num_ids > 1:
            y0, x0, y1, x1 = (gates.boxes[i] if gates.mode == "route" else gates.boxes[0])
            ImageDraw.Draw(tinted).rectangle([x0 * width, y0 * height, x1 * width - 1, y1 * height - 1],
                                             outline=tuple(int(v) for v in colour))
        out.append((np.asarray(tinted), f"identity {i + 1}: SAA gate (mean over layers and steps)"))
    return out


def annotate_face(ref: ReferenceFace, colour: Sequence[int], side: int = 256) -> tuple[np.ndarray, str]:
    """The reference with its detected box and five keypoints drawn in the identity's colour, and a caption with
    the head pose and the automatic source prompt."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(ref.image)
    scale = side / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = (float(v) * scale for v in ref.face.bbox)
    draw.rectangle([x0, y0, x1, y1], outline=tuple(colour), width=2)
    for x, y in np.asarray(ref.face.kps) * scale:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(60, 230, 60))
    pitch, yaw, roll = (float(v) for v in ref.face.pose)
    return np.asarray(img), (f"reference {ref.slot}: pitch {pitch:+.0f}°, yaw {yaw:+.0f}°, roll {roll:+.0f}° — "
                             f"source prompt: {ref.source_prompt}")


def _scheduler_config(scheduler: Any) -> dict:
    return {"_class_name": type(scheduler).DIFFUSERS_CLASS, **scheduler.config.to_dict()}


def _boxes_message(message: str) -> str:
    # the library counts boxes from 0; the page numbers references from 1
    import re

    return re.sub(r"\bboxes (\d+)", lambda m: f"boxes {int(m.group(1)) + 1}",
                  re.sub(r"\bbox(es)? (\d+) (\[[^\]]*\]) and (\d+)",
                         lambda m: f"box {int(m.group(2)) + 1} {m.group(3)} and box {int(m.group(4)) + 1}", message))


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) or (
        isinstance(value, float) and value.is_integer())


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)
