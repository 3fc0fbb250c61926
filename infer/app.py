"""The web app: identity personalisation in a browser (Gradio), and the same call over HTTP (``gradio_client``).

    python -m infer.app                       # the embedded SynthFace world that `make demo` trains
    python -m infer.app --model SD15 --dynamicid CONVERTED --image-encoder CLIP-H --analyzer insightface \
        [--infinite-id DIR] [--port 7860]

The page: one to four reference photos (upload, webcam, clipboard or the examples), prompt and negative prompt,
a layout (row, grid, or one box per reference drawn on a canvas in the identity's colour), a face prompt per
person (IMR expression / pose edit) beside the automatic source prompt, ID scale, steps, guidance, seed, size,
scheduler and method; the result with each identity's SAA gate overlay, and the detected reference faces.
Errors appear under the field that caused them. The API endpoint ``/generate`` takes the same inputs (see
``docs/webapp.md``). Everything runs through :class:`infer.app_engine.Engine`: one sampler at a time, a bounded
queue, compiled samplers reused.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import logging
import os
import shutil
import sys
import tempfile
import threading
import uuid
from typing import Any

import numpy as np

from infer.app_engine import (LAYOUTS, MAX_REFERENCES, SCHEDULERS, BusyError, Engine, FieldError, Request,
                              Result, annotate_face, boxes_from_drawing, format_boxes)

LOG = logging.getLogger("infer.app")
CSS = ".field-error { color: #c0392b; font-weight: 600; } .field-error p { margin: 2px 0; }"


def _hex(colour) -> str:
    return "#%02x%02x%02x" % tuple(colour)


def _colours():
    from dynamicid_jax.pipelines.gates import IDENTITY_COLOURS

    return [IDENTITY_COLOURS[i % len(IDENTITY_COLOURS)] for i in range(MAX_REFERENCES)]


def _request(values: list) -> Request:
    """The page's / the API's inputs, in :func:`build_app`'s ``inputs`` order → a :class:`Request`."""
    (prompt, negative, *rest) = values
    refs, face_prompts = rest[:MAX_REFERENCES], rest[MAX_REFERENCES:2 * MAX_REFERENCES]
    method, layout, boxes, id_scale, steps, guidance, seed, height, width, scheduler = rest[2 * MAX_REFERENCES:]
    return Request(prompt=prompt or "", negative_prompt=negative or "", references=list(refs),
                   face_prompts=list(face_prompts), method=method, layout=layout, boxes=boxes or "",
                   id_scale=_number(id_scale), steps=_number(steps), guidance=_number(guidance), seed=_number(seed),
                   height=_number(height), width=_number(width), scheduler=scheduler)


def _number(value: Any) -> Any:
    """Sliders and number boxes send floats; whole numbers become ints (the engine checks the rest)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class ResultFiles:
    """The PNG files of the results the app hands to Gradio, newest ``keep`` kept (removed at exit).

    Gradio stores an image it gets as an array under the hash of its bytes, writing that file in place, so two
    requests with identical outputs (same seed and inputs) race on one file and a download can read it half
    written. A file path it copies atomically instead — hence one file per output here."""

    def __init__(self, keep: int = 512):
        self.folder = tempfile.mkdtemp(prefix="dynamicid-app-")
        atexit.register(shutil.rmtree, self.folder, True)
        self._files: collections.deque[str] = collections.deque()
        self._keep, self._lock = keep, threading.Lock()

    def save(self, image: np.ndarray) -> str:
        from PIL import Image

        path = os.path.join(self.folder, f"{uuid.uuid4().hex}.png")
        Image.fromarray(np.asarray(image)).save(path, format="PNG")
        with self._lock:
            self._files.append(path)
            while len(self._files) > self._keep:
                old = self._files.popleft()
                if os.path.exists(old):
                    os.remove(old)
        return path

    def gallery(self, items: list[tuple[np.ndarray, str]]) -> list[tuple[str, str]]:
        return [(self.save(image), caption) for image, caption in items]


def _result_items(result: Result) -> list[tuple[np.ndarray, str]]:
    return [(result.image, f"result ({result.image.shape[1]}×{result.image.shape[0]})"), *result.gate_overlays]


def _face_items(result: Result) -> list[tuple[np.ndarray, str]]:
    colours = _colours()
    return [annotate_face(f, colours[f.slot - 1]) for f in result.faces]


def build_app(engine: Engine, *, title: str = "dynamicid-jax"):
    """The Gradio page (a ``gr.Blocks``) serving ``engine``; launch it with :func:`launch`."""
    import gradio as gr

    colours = _colours()
    files = ResultFiles()
    errors: dict[str, Any] = {}

    def error_slot(field: str):
        errors[field] = gr.Markdown(visible=False, elem_id=f"error-{field.replace('_', '-')}",
                                    elem_classes=["field-error"])

    step = engine.size_multiple
    max_ui_side = min(engine.max_side, max(1024, engine.native_size))
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# DynamicID: identity personalisation\nServing {engine.models.description or 'your weights'}. "
                    f"One to four reference photos, one person each; every person gets a box in the image.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                error_slot("prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                error_slot("negative_prompt")
                refs, face_prompts, sources = [], [], []
                with gr.Row():
                    for i in range(1, MAX_REFERENCES + 1):
                        with gr.Column(min_width=150):
                            gr.HTML(f"<b style='color:{_hex(colours[i - 1])}'>■ person {i}</b>")
                            refs.append(gr.Image(label=f"Reference {i}", type="numpy", height=180,
                                                 sources=["upload", "webcam", "clipboard"], elem_id=f"reference-{i}"))
                            error_slot(f"reference_{i}")
                            face_prompts.append(gr.Textbox(label=f"Face prompt {i} (expression, pose)",
                                                           placeholder="a happy expression, front view",
                                                           elem_id=f"face-prompt-{i}"))
                            error_slot(f"face_prompt_{i}")
                            sources.append(gr.Textbox(label="automatic source prompt", interactive=False,
                                                      elem_id=f"source-prompt-{i}"))
                error_slot("references")
                if engine.models.examples:
                    ex = engine.models.examples
                    rows = [ex[:2] + [None] * (MAX_REFERENCES - 2)] if len(ex) > 2 else []  # two people
                    rows.append((ex + [None] * MAX_REFERENCES)[:MAX_REFERENCES])  # as many as there are
                    gr.Examples(examples=rows, inputs=refs, label="Example references (held-out identities)")
                layout = gr.Radio(list(LAYOUTS), value="row", label="Layout (row / grid: automatic; boxes: drawn)",
                                  elem_id="layout")
                error_slot("layout")
                with gr.Group(visible=False) as box_group:
                    canvas = gr.ImageEditor(
                        value=np.full((256, 256, 3), 255, np.uint8), type="numpy", image_mode="RGBA", layers=False,
                        sources=[], transforms=[], height=300, label="Draw one box per person in its colour",
                        brush=gr.Brush(colors=[_hex(c) for c in colours], default_color=_hex(colours[0]),
                                       color_mode="fixed", default_size=12), elem_id="layout-canvas")
                    boxes = gr.Textbox(label="Boxes: y0,x0,y1,x1 per person (0–1), separated by ';'",
                                       elem_id="boxes")
                error_slot("boxes")
            with gr.Column(scale=2):
                method = gr.Radio(engine.methods, value=engine.methods[0], label="Method", elem_id="method")
                error_slot("method")
                id_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="ID scale", elem_id="id-scale")
                error_slot("id_scale")
                steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="steps")
                error_slot("steps")
                guidance = gr.Slider(0.0, 15.0, value=5.0, step=0.5, label="Guidance", elem_id="guidance")
                error_slot("guidance")
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                error_slot("seed")
                with gr.Row():
                    height = gr.Slider(step, max_ui_side, value=engine.native_size, step=step, label="Height",
                                       elem_id="height")
                    width = gr.Slider(step, max_ui_side, value=engine.native_size, step=step, label="Width",
                                      elem_id="width")
                error_slot("size")
                scheduler = gr.Dropdown(list(SCHEDULERS), value="ddim", label="Scheduler", elem_id="scheduler")
                error_slot("scheduler")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status")
                error_slot("general")
                gallery = gr.Gallery(label="Result and each person's SAA gate", columns=3, height=300,
                                     elem_id="results", format="png")
                faces = gr.Gallery(label="Detected reference faces (box, keypoints, pose)", columns=4,
                                   height=280, elem_id="faces", format="png")
        api_button = gr.Button(visible=False)
        api_image = gr.Image(visible=False, format="png")
        api_gates = gr.Gallery(visible=False, format="png")
        api_info = gr.JSON(visible=False)

        inputs = [prompt, negative, *refs, *face_prompts, method, layout, boxes, id_scale, steps, guidance, seed,
                  height, width, scheduler]
        ui_outputs = [gallery, faces, status, *sources, *errors.values()]

        def ui_generate(*values, progress=gr.Progress()):
            out: dict = {slot: gr.update(value="", visible=False) for slot in errors.values()}
            say = lambda message: progress(None, desc=message)  # noqa: E731
            try:
                result = engine.generate(_request(list(values)), say)
            except FieldError as err:
                out[errors.get(err.field, errors["general"])] = gr.update(value=f"⚠ {err.message}", visible=True)
                out[status] = f"Not generated: fix the field marked ⚠ ({err.field.replace('_', ' ')})."
                return out
            except BusyError as err:
                out[status] = f"**{err}**"
                return out
            except Exception as err:  # never a trace on the page; the log keeps it
                LOG.exception("generation failed")
                out[errors["general"]] = gr.update(value=f"⚠ internal error ({type(err).__name__}): "
                                                         f"{' '.join(str(err).split())}", visible=True)
                out[status] = "Not generated."
                return out
            out[gallery], out[faces] = files.gallery(_result_items(result)), files.gallery(_face_items(result))
            out[status] = result.status
            by_slot = {f.slot: f.source_prompt for f in result.faces}
            for i, box in enumerate(sources, start=1):
                out[box] = by_slot.get(i, "")
            return out

        def api_generate(*values, progress=gr.Progress()):
            try:
                result = engine.generate(_request(list(values)), lambda m: progress(None, desc=m))
            except FieldError as err:
                raise gr.Error(f"{err.field}: {err.message}", print_exception=False) from None
            except BusyError as err:
                raise gr.Error(str(err), title="Busy", print_exception=False) from None
            info = {"status": result.status, "compiled": result.compiled, "seconds": result.seconds,
                    "faces": [{"reference": f.slot, "bbox": [float(v) for v in f.face.bbox],
                               "pose": [float(v) for v in f.face.pose], "source_prompt": f.source_prompt}
                              for f in result.faces]}
            return files.save(result.image), files.gallery(result.gate_overlays), info

        run.click(ui_generate, inputs=inputs, outputs=ui_outputs, api_visibility="private", concurrency_limit=None)
        api_button.click(api_generate, inputs=inputs, outputs=[api_image, api_gates, api_info], api_name="generate",
                         concurrency_limit=None)
        layout.change(lambda v: gr.update(visible=v == "boxes"), inputs=layout, outputs=box_group,
                      api_visibility="private", queue=False)

        def drawn_boxes(value):
            found = boxes_from_drawing((value or {}).get("composite"), colours)
            return format_boxes(found) if found else gr.update()

        gr.on([canvas.change, canvas.input, canvas.apply], drawn_boxes, inputs=canvas, outputs=boxes,
              api_visibility="private", queue=False, trigger_mode="always_last")
    app.errors = errors  # for tests: field → its error slot
    return app


def launch(engine: Engine, *, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True, **kwargs):
    """Build and start the app; returns ``(app, url)``. ``block=False`` returns at once (tests)."""
    app = build_app(engine)
    # The engine is the queue's bound (a clear "busy" beyond it), so Gradio's own queue admits every request.
    app.queue(max_size=None, default_concurrency_limit=None)
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                           max_threads=max(40, engine.max_queue + 8), css=CSS, footer_links=["api"], **kwargs)
    return app, url


def main(argv: list[str] | None = None) -> int:
    from dynamicid_jax.cli_args import add_deprecated_alias
    from infer.app_models import DEFAULT_DEMO_DIR, MissingModelsError, ModelSpec, embedded_spec, load_models

    p = argparse.ArgumentParser(prog="python -m infer.app", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", dest="sd", metavar="PATH",
                   help="Stable Diffusion 1.5: diffusers folder or single .safetensors file")
    p.add_argument("--dynamicid", metavar="PATH", help="converted DynamicID folder (python -m infer.convert)")
    p.add_argument("--image-encoder", dest="clip_vision", metavar="PATH",
                   help="CLIP vision folder (CLIP-ViT-H-14; default DYNAMICID/image_encoder)")
    p.add_argument("--analyzer", default="insightface", help="face analyzer: insightface, dlib or synthetic")
    p.add_argument("--analyzer-root", metavar="DIR", help="the face analyzer's model folder (insightface: the "
                   "model-pack root; dlib: its model folder; synthetic: the SynthFace face-models folder)")
    p.add_argument("--infinite-id", metavar="DIR", help="Infinite-ID weights (train.infinite_id export)")
    p.add_argument("--infinite-id-image-encoder", dest="infinite_id_clip_vision", metavar="PATH",
                   help="its CLIP vision tower (default INFINITE_ID/image_encoder)")
    p.add_argument("--demo-dir", default=DEFAULT_DEMO_DIR, help="without --model: the folder `make demo` wrote")
    p.add_argument("--example", action="append", default=None, metavar="IMAGE", help="an example reference photo "
                                                                                     "(repeat)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-queue", type=int, default=8, help="requests running or waiting; more get a busy message")
    # the same names as infer.generate (one name per concept); the first spellings stay as deprecated aliases
    for old, new in (("--sd", "--model"), ("--clip-vision", "--image-encoder"),
                     ("--infinite-id-clip-vision", "--infinite-id-image-encoder")):
        add_deprecated_alias(p, old, new)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.max_queue < 1:
        p.error("--max-queue must be at least 1")
    if (args.sd is None) != (args.dynamicid is None):
        p.error("--model and --dynamicid come together (or give neither to serve the embedded SynthFace world)")
    try:
        if args.sd is None:
            spec = embedded_spec(args.demo_dir)
        else:
            kwargs = {"root": args.analyzer_root} if args.analyzer_root else {}  # each backend's folder keyword
            spec = ModelSpec(sd=args.sd, dynamicid=args.dynamicid, clip_vision=args.clip_vision,
                             analyzer=args.analyzer, analyzer_kwargs=kwargs, infinite_id=args.infinite_id,
                             infinite_id_clip_vision=args.infinite_id_clip_vision,
                             description=f"{args.sd} + {args.dynamicid}")
        if args.example:
            spec.examples = list(args.example)
        models = load_models(spec)
    except (MissingModelsError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"infer.app: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    launch(Engine(models, max_queue=args.max_queue), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
