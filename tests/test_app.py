"""The web app (infer.app) on tiny models: the engine's checks, a real browser driving the page, and a load test
through gradio_client — all against one app instance on localhost (tests/app_world.py builds its models).

The browser test drives Debian's ``chromium`` through Playwright (pointed at the system browser: browser downloads
are impossible here); without Chromium or Playwright it is skipped with the reason. Screenshots of each step go
to the test's tmp folder (named in the failure message); with ``DYNAMICID_APP_SCREENSHOT=PATH`` the page after
the first generation is also saved there (how docs/app.png was made)."""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio", reason="the web app needs gradio (pip install -e '.[app]')")

import app_world as W  # noqa: E402
from infer.app_engine import FieldError, Request, boxes_from_drawing, format_boxes, parse_boxes  # noqa: E402

SIZE, STEPS = 64, 2
PROMPT = "a portrait of two people, in a bus"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LOAD_REQUESTS = 16


@pytest.fixture(scope="module")
def world(tiny_sd_dir, torch, tmp_path_factory):
    pytest.importorskip("dlib", reason="the app tests analyse real faces with dlib (the faces extra)")
    if W.group_photo() is None:
        pytest.skip("the test photos ship in the insightface package, which is not installed")
    folder = str(tmp_path_factory.mktemp("app_world"))
    return {"paths": W.build_tiny_models(folder, tiny_sd_dir), "refs": W.write_references(os.path.join(folder,
                                                                                                       "refs"))}


@pytest.fixture(scope="module")
def server(world):
    """One app instance (queue bound = the load test's 16 requests) on a free localhost port."""
    from infer.app import launch

    engine = W.load_engine(world["paths"], max_queue=LOAD_REQUESTS)
    engine.models.examples = [world["refs"]["person_1"], world["refs"]["person_2"]]  # the page's example row
    # Gradio's start-up check fetches the page once with a 3 s timeout and gives up on the first timeout, which a
    # test run sharing two cores with other work can exceed; the same check with a patient timeout:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("gradio.networking.url_ok", patient_url_ok)
        app, url = launch(engine, port=None, block=False)
    yield engine, url
    app.close()


def patient_url_ok(url: str) -> bool:
    import httpx

    for _ in range(5):
        try:
            if httpx.head(url, timeout=60).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return False


def rgb(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def api_args(refs, *, first="person_1", face_prompt="", layout="row", boxes=""):
    from gradio_client import handle_file

    return [PROMPT, "", handle_file(refs[first]), handle_file(refs["person_2"]), None, None, face_prompt, "", "", "",
            "DynamicID", layout, boxes, 1.0, STEPS, 5.0, 0, SIZE, SIZE, "ddim"]


# ---------------------------------------------------------------------------------------------------------
# engine
# ---------------------------------------------------------------------------------------------------------
def test_boxes_text_and_drawing():
    """Typed boxes parse (bad text names the box), and strokes on the canvas become one box per colour."""
    assert parse_boxes("0,0,1,.5; 0,.5,1,1") == [[0, 0, 1, 0.5], [0, 0.5, 1, 1]]
    assert parse_boxes("  ") is None
    with pytest.raises(FieldError, match="box 2 has 3 numbers"):
        parse_boxes("0,0,1,1; 0,0,1")
    canvas = np.zeros((100, 200, 4), np.uint8)
    canvas[10:50, 20:60] = (230, 40, 40, 255)
    canvas[60:90, 120:180] = (40, 110, 240, 255)
    boxes = boxes_from_drawing(canvas, [(230, 40, 40), (40, 110, 240), (40, 190, 70)])
    assert format_boxes(boxes) == "0.10,0.10,0.50,0.30; 0.60,0.60,0.90,0.90"


def test_embedded_world_paths_and_missing_message(tmp_path, capsys):
    """No flags: the folder `make demo` writes is served, held-out SynthFace faces as examples; when it is missing,
    `python -m infer.app` stops with one line naming the command that makes it (and builds nothing)."""
    from infer import app
    from infer.app_models import EMBEDDED, MissingModelsError, embedded_spec

    with pytest.raises(MissingModelsError, match="run `make demo` first"):
        embedded_spec(str(tmp_path / "demo_out"))
    assert app.main(["--demo-dir", str(tmp_path / "demo_out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run `make demo` first" in err and "Traceback" not in err
    assert not (tmp_path / "demo_out").exists()
    for rel in (EMBEDDED.dynamicid, EMBEDDED.face_models):
        (tmp_path / "demo_out" / rel).mkdir(parents=True)
    for name in ("h1", "h0", "h2"):
        face = tmp_path / "demo_out" / EMBEDDED.synthface / "heldout" / name / "neutral_front.png"
        face.parent.mkdir(parents=True)
        face.write_bytes(b"")
    spec = embedded_spec(str(tmp_path / "demo_out"))
    from synthface.demo_base import ASSET_DIR

    assert spec.sd == ASSET_DIR  # no record of a base the demo trained itself: the shipped one
    trained = tmp_path / "demo_out" / "work" / "stage0" / "asset"
    trained.mkdir(parents=True)
    (tmp_path / "demo_out" / EMBEDDED.stages).write_text(json.dumps({"stage0": {"result": {"sd": str(trained)}}}))
    assert embedded_spec(str(tmp_path / "demo_out")).sd == str(trained)  # a base the demo trained (--rebuild-base)
    assert spec.analyzer == "synthetic" and spec.analyzer_kwargs == {
        "models_dir": str(tmp_path / "demo_out" / EMBEDDED.face_models)}
    assert [os.path.basename(os.path.dirname(p)) for p in spec.examples] == ["h0", "h1", "h2"]
    assert spec.infinite_id is None  # the demo ran without --infinite-id


def test_engine_errors_name_their_field(server, world):
    """Each bad input is refused with the field that caused it; nothing is sampled."""
    engine, _ = server
    p1, p2 = rgb(world["refs"]["person_1"]), rgb(world["refs"]["person_2"])
    cases = [
        (dict(references=[rgb(world["refs"]["no_face"])]), "reference_1", "no face"),
        (dict(references=[p1, rgb(world["refs"]["group"])]), "reference_2", "6 faces"),
        (dict(references=[p1, p2], layout="boxes", boxes="0,0,1,.6; 0,.4,1,1"), "boxes",
         "box 1 .* and box 2 .*overlap"),
        (dict(references=[p1, p2], layout="boxes", boxes="0,0,1,.5"), "boxes", None),  # one box = mixing: fine
        (dict(references=[p1] * 5), "references", "5 references"),
        (dict(references=[]), "references", "at least one"),
        (dict(references=[p1], face_prompts=[None, "smiling"]), "face_prompt_2", "no reference photo in slot 2"),
        (dict(references=[p1], height=60), "size", "multiple of"),
        (dict(references=[p1], steps=0), "steps", "1 to"),
        (dict(references=[p1], guidance=float("nan")), "guidance", None),
        (dict(references=[p1], method="Infinite-ID"), "method", "Infinite-ID needs"),
        (dict(prompt="  ", references=[p1]), "prompt", "write a prompt"),
    ]
    seen = set(engine._seen_shapes)
    for kwargs, field, message in cases:
        request = Request(**{"prompt": PROMPT, "steps": STEPS, **kwargs})
        if field == "boxes" and message is None:
            engine._check(request)  # accepted
            continue
        with pytest.raises(FieldError) as err:
            engine._check(request)
        assert err.value.field == field, (kwargs, err.value)
        if message:
            assert re.search(message, err.value.message), err.value.message
    assert engine._seen_shapes == seen and engine.pending == 0


# ---------------------------------------------------------------------------------------------------------
# the page in a real browser
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium); the browser test is skipped")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    profile = tmp_path_factory.mktemp("chromium_profile")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, viewport={"width": 1400, "height": 1000},
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        context.close()


def save_small_screenshot(page, path):
    """The whole page as a 128-colour PNG (a few hundred KB at most, for the README)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def draw_two_boxes(page):
    """Layout "boxes": a stroke on the left half of the canvas in person 1's colour, one on the right in person 2's;
    the boxes field then holds their bounding boxes (the canvas's white image is centred in its drawing area)."""
    page.locator("#layout label", has_text="boxes").click()
    page.locator("#layout-canvas").scroll_into_view_if_needed()
    page.locator("#layout-canvas button[aria-label='Brush']").click()
    area = page.locator("#layout-canvas canvas").first.bounding_box()
    cx, cy = area["x"] + area["width"] / 2, area["y"] + area["height"] / 2
    for person, (x0, x1) in enumerate(((-95, -25), (25, 95))):
        if person:
            page.locator("#layout-canvas button[aria-label='Color']").click()
            page.locator("#layout-canvas button.color").nth(person).click()
        page.mouse.move(cx + x0, cy - 80)
        page.mouse.down()
        page.mouse.move(cx + x1, cy + 80, steps=10)
        page.mouse.up()
    # the canvas reports while a stroke is drawn: wait for both whole strokes (each about 160 px of 230 tall)
    page.wait_for_function("""() => { const b = document.querySelector('#boxes textarea').value.split(';');
        return b.length == 2 && b.every(x => { const v = x.split(',').map(Number); return v[2] - v[0] > 0.5; }); }""")
    first, second = parse_boxes(page.locator("#boxes textarea").input_value())
    assert first[3] < 0.5 < second[1], (first, second)


def test_browser_generate_and_no_face_message(server, world, browser_page, tmp_path):
    """In Chromium: upload two references, draw one box per person on the layout canvas (each in its colour), set a
    face prompt, generate → the gallery holds the 64×64 result and one gate overlay per identity, the detected faces
    and the automatic source prompt appear; then a reference without a face → the message under that reference."""
    engine, url = server
    page, refs = browser_page, world["refs"]
    shots = []

    def shot(name):
        shots.append(str(tmp_path / f"{len(shots):02d}_{name}.png"))
        page.screenshot(path=shots[-1], full_page=True)

    try:
        page.goto(url)
        page.locator("#prompt textarea").fill(PROMPT)
        page.locator("#reference-1 input[type=file]").set_input_files(refs["person_1"])
        page.locator("#reference-2 input[type=file]").set_input_files(refs["person_2"])
        page.locator("#reference-2 img").wait_for()
        page.locator("#face-prompt-1 textarea").fill("a happy expression, front view")
        draw_two_boxes(page)
        steps = page.locator("#steps input[type=number]")
        steps.fill(str(STEPS))
        steps.press("Enter")
        shot("filled")
        page.locator("#generate").click()
        status = page.locator("#status")
        page.wait_for_function("() => document.querySelector('#status').innerText.includes('done in')",
                               timeout=300_000)
        shot("generated")
        if os.environ.get("DYNAMICID_APP_SCREENSHOT"):
            save_small_screenshot(page, os.environ["DYNAMICID_APP_SCREENSHOT"])
        results = page.locator("#results img")
        assert results.count() == 3, f"result + 2 gate overlays expected, got {results.count()} images"
        sizes = results.evaluate_all("imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
        assert sizes[0] == [SIZE, SIZE] and all(s == [SIZE, SIZE] for s in sizes)
        assert "identity 2: SAA gate" in page.locator("#results").inner_text()
        assert page.locator("#faces img").count() == 2
        assert "neutral expression" in page.locator("#source-prompt-1 textarea").input_value()
        assert "compiled" in status.inner_text()

        page.locator("#reference-1 button[aria-label='Remove Image']").click()
        page.locator("#reference-1 input[type=file]").set_input_files(refs["no_face"])
        page.locator("#reference-1 img").wait_for()
        page.locator("#generate").click()
        error = page.locator("#error-reference-1")
        error.wait_for(state="visible")
        assert "no face found" in error.inner_text()
        assert "Traceback" not in page.content()
        shot("no_face")
    except Exception as err:
        raise AssertionError(f"{err}\nscreenshots: {', '.join(shots) or 'none'}") from err


# ---------------------------------------------------------------------------------------------------------
# load: 16 concurrent requests through gradio_client
# ---------------------------------------------------------------------------------------------------------
def test_load_sixteen_concurrent_requests_and_busy(server, world, tmp_path):
    """16 requests submitted at once through gradio_client while the sampler is held: all are admitted (the 17th
    gets the busy message at once), then all 16 complete with a 64×64 image and two gate overlays each — none lost,
    the compiled sampler reused, and the process memory grows by less than 300 MB."""
    import psutil
    from gradio_client import Client
    from PIL import Image

    engine, url = server
    client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"), analytics_enabled=False)
    client.predict(*api_args(world["refs"]), api_name="/generate")  # warm: compiled, faces cached
    process = psutil.Process()
    rss_before = process.memory_info().rss
    compiled_before = engine._variant("DynamicID", "ddim").num_compiled
    with engine._sampler:  # hold the sampler so the queue fills deterministically
        jobs = [client.submit(*api_args(world["refs"]), api_name="/generate") for _ in range(LOAD_REQUESTS)]
        deadline = time.monotonic() + 60
        while engine.pending < LOAD_REQUESTS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.pending == LOAD_REQUESTS
        with pytest.raises(Exception, match="busy: 16 requests are already queued"):
            client.predict(*api_args(world["refs"]), api_name="/generate")
    results = [job.result(timeout=300) for job in jobs]
    assert len(results) == LOAD_REQUESTS and engine.pending == 0
    for image_path, gates, info in results:
        assert np.asarray(Image.open(image_path)).shape == (SIZE, SIZE, 3)
        assert len(gates) == 2 and info["compiled"] is False and len(info["faces"]) == 2
    assert engine._variant("DynamicID", "ddim").num_compiled == compiled_before
    growth = (process.memory_info().rss - rss_before) / 2 ** 20
    assert growth < 300, f"memory grew by {growth:.0f} MB over {LOAD_REQUESTS} requests"

