"""The page answering in real headless Chromium with onnxruntime-web: the exported folder
served by `python -m http.server` (and used with the network cut), and `serve`'s page
switched to answering in the browser. Every answer is checked against `predict --json`
and every 28x28 against `predict --show-input`.

Needs Debian's chromium (`make browser`) and onnxruntime-web in the cache (`make setup`);
each test skips, saying why, where one is missing.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve_browser import CHROMIUM, LAUNCH_ARGS, TIMEOUT_MS, draw, screenshot

from digit_strokes import draw_digit, photo_like, strokes_in_box

READY_MS = 60_000  # the first load compiles the runtime; serve also exports the model first
MAX_GRAY_LEVELS = 2  # the browser's 28x28 against predict --show-input's, per pixel
MAX_PROBABILITY_DIFFERENCE = 1e-3


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is missing: pip install -e '.[dev]'"
    )
    if not CHROMIUM.exists():
        pytest.skip(
            f"no browser: {CHROMIUM} is missing (`make browser` installs Debian's chromium)"
        )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield browser
        browser.close()


def static_server(folder: Path):
    """`python -m http.server` serving `folder` on 127.0.0.1: (process, base URL)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", str(folder), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}/"
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("python -m http.server did not start")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def static_page(web_export):
    process, url = static_server(web_export)
    yield url
    process.terminate()
    process.wait(timeout=10)


class Watched:
    """A page, with what it asked for and the errors it reported."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1000, "height": 900}, has_touch=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.goto(url)

    def wait_until_ready(self) -> None:
        self.page.wait_for_selector("body[data-ready=browser]", state="attached", timeout=READY_MS)

    def answer(self) -> dict:
        """What the page shows: class, every class's probability, the 28x28 it saw."""
        page = self.page
        probs = page.eval_on_selector_all(
            "#bars li", "rows => rows.map(r => r.dataset.probability)"
        )
        src = page.get_attribute("#seen", "src")
        seen = Image.open(io.BytesIO(base64.b64decode(src.partition(",")[2]))).convert("L")
        return {
            "class_name": page.text_content("#top-class"),
            "probabilities": np.array([float(p) for p in probs]),
            "seen": np.asarray(seen, dtype=np.int16),
            "by": page.get_attribute("body", "data-answered-by"),
        }

    def canvas_png(self, path: Path) -> Path:
        url = self.page.evaluate("document.getElementById('canvas').toDataURL('image/png')")
        path.write_bytes(base64.b64decode(url.partition(",")[2]))
        return path

    def close(self) -> None:
        self.context.close()


def touch_draw(watched: Watched, digit: int) -> None:
    """Draw `digit` with a finger: touch events, stroke by stroke."""
    page = watched.page
    cdp = watched.context.new_cdp_session(page)
    box = page.locator("#canvas").bounding_box()
    w, h = box["width"], box["height"]
    frame = (box["x"] + 0.3 * w, box["y"] + 0.15 * h, 0.4 * w, 0.7 * h)
    for stroke in strokes_in_box(digit, frame):
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [
            {"x": stroke[0][0], "y": stroke[0][1]}]})  # fmt: skip
        for (x0, y0), (x1, y1) in itertools.pairwise(stroke):
            for t in (1 / 3, 2 / 3, 1):
                point = {"x": x0 + t * (x1 - x0), "y": y0 + t * (y1 - y0)}
                cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    cdp.detach()


def drop(page, path: Path, kind: str) -> None:
    transfer = page.evaluate_handle(
        """([b64, name, kind]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: kind }));
            return transfer;
        }""",
        [base64.b64encode(path.read_bytes()).decode(), path.name, kind],
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})


def predicted(run: Path, files: list[Path], folder: Path) -> list[dict]:
    """`predict --json --show-input` for `files`: each record, with `seen` the 28x28."""
    done = subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "predict", str(run), *map(str, files), "--json",
         "--top-k", "100", "--show-input", str(folder / "seen.png")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    for i, record in enumerate(records):
        name = "seen.png" if len(files) == 1 else f"seen-{i + 1}.png"
        record["seen"] = np.asarray(Image.open(folder / name), dtype=np.int16)
        probs = np.zeros(len(record["top_k"]))
        for entry in record["top_k"]:
            probs[entry["class_index"]] = entry["probability"]
        record["probabilities"] = probs
    return records


def assert_same_answer(shown: dict, record: dict, what: str) -> None:
    worst = int(np.abs(shown["seen"] - record["seen"]).max())
    assert worst <= MAX_GRAY_LEVELS, f"{what}: the 28x28 differs by {worst} gray levels"
    assert shown["class_name"] == record["class_name"], what
    gap = float(np.abs(shown["probabilities"] - record["probabilities"]).max())
    assert gap <= MAX_PROBABILITY_DIFFERENCE, f"{what}: probabilities differ by {gap}"


# --- the exported folder -------------------------------------------------------------------


def test_the_exported_page_answers_with_the_network_cut(
    browser, static_page, trained_run, tmp_path
):
    from playwright.sync_api import expect

    watched = Watched(browser, static_page)
    page = watched.page
    expect(page.locator("#run-info")).to_contain_text("MNIST")
    expect(page.locator("#run-info")).to_contain_text("test accuracy")
    expect(page.locator("#bars li")).to_have_count(10)
    watched.wait_until_ready()
    assert all(url.startswith(static_page) for url in watched.requests), watched.requests
    assert page.is_hidden("#mode") and page.is_visible("#foot-static")

    # From here on, nothing may leave the page: the network is cut and the page must not try.
    page.route("**/*", lambda route: route.abort())
    loaded = len(watched.requests)

    draw(page, 3)
    expect(page.locator("#top-class")).to_have_text("3")
    page.wait_for_timeout(300)  # the last stroke's answer
    mouse = watched.answer()
    files = [watched.canvas_png(tmp_path / "mouse-3.png")]
    page.keyboard.press("Escape")
    expect(page.locator("#top-class")).to_have_text("–")
    expect(page.locator("#seen")).to_be_hidden()

    touch_draw(watched, 7)
    expect(page.locator("#top-class")).to_have_text("7")
    page.wait_for_timeout(300)
    finger = watched.answer()
    files.append(watched.canvas_png(tmp_path / "touch-7.png"))

    photo = tmp_path / "four.png"
    draw_digit(4, 240, angle=-4).save(photo)
    drop(page, photo, "image/png")
    expect(page.locator("#source")).to_have_text("four.png")
    dropped = watched.answer()
    files.append(photo)

    page.check("#layers")
    expect(page.locator(".stage-maps")).to_have_count(3)
    expect(page.locator(".stage figcaption").first).to_contain_text("16 maps of 28×28")
    screenshot(page, "web-export-layers.png")
    assert {mouse["by"], finger["by"], dropped["by"]} == {"browser"}
    assert len(watched.requests) == loaded, watched.requests[loaded:]
    assert not watched.errors, watched.errors
    # The policy forbids it too: the page could not fetch even its own folder now.
    assert page.evaluate("fetch('model.json').then(() => 'fetched', () => 'refused')") == "refused"
    watched.close()

    for shown, record in zip([mouse, finger, dropped], predicted(trained_run, files, tmp_path),
                             strict=True):  # fmt: skip
        assert_same_answer(shown, record, record["input"])


def photos_and_drawings(folder: Path) -> list[Path]:
    """Photo-like digits (PNG and JPEG), drawings, a light-on-dark one, a transparent one
    and an MNIST-like 28x28: the pictures `predict` is documented to take."""
    rng = np.random.default_rng(11)
    files = []
    for i in range(16):
        path = folder / f"photo-{i}.{'jpg' if i % 2 else 'png'}"
        photo_like(i % 10, rng).save(path)
        files.append(path)
    for digit, size in ((0, 200), (2, 333), (5, 560), (8, 420)):
        draw_digit(digit, size).save(folder / f"drawn-{digit}.png")
        files.append(folder / f"drawn-{digit}.png")
    dark = 255 - np.asarray(draw_digit(6, 260).convert("L"))
    Image.fromarray(dark).save(folder / "light-on-dark.png")
    ink = np.asarray(draw_digit(9, 220).convert("L"))
    rgba = np.zeros((*ink.shape, 4), np.uint8)
    rgba[..., 3] = 255 - ink  # ink opaque, paper transparent
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    small = np.zeros((28, 28), np.uint8)
    small[6:22, 11:17] = rng.integers(120, 256, (16, 6))
    Image.fromarray(small).save(folder / "mnist-like.png")
    return [
        *files,
        folder / "light-on-dark.png",
        folder / "transparent.png",
        folder / "mnist-like.png",
    ]


def test_photos_and_drawings_give_the_28x28_and_answer_of_predict(
    browser, static_page, trained_run, tmp_path
):
    from playwright.sync_api import expect

    files = photos_and_drawings(tmp_path)
    watched = Watched(browser, static_page)
    watched.wait_until_ready()
    shown = []
    for path in files:
        watched.page.set_input_files("#file", str(path))
        expect(watched.page.locator("#source")).to_have_text(path.name)
        shown.append(watched.answer())
    assert not watched.errors, watched.errors
    watched.close()
    records = predicted(trained_run, files, tmp_path)
    for answer, record, path in zip(shown, records, files, strict=True):
        assert_same_answer(answer, record, path.name)


def test_a_fashion_page_names_its_classes_and_fills_the_frame(browser, tmp_path_factory):
    from playwright.sync_api import expect

    from mnist_cnn import build_model, fit, load_dataset
    from mnist_cnn.web import cached_runtime, export_web

    if cached_runtime() is None:
        pytest.skip("onnxruntime-web is not in the cache (make setup)")
    import torch

    folder = tmp_path_factory.mktemp("fashion")
    torch.manual_seed(0)
    fit(build_model("seed"), load_dataset("fashion-mnist"), "seed", epochs=0.1,
        out=folder / "run", progress=False, log=None, threads=1)  # fmt: skip
    page_dir, _, _ = export_web(folder / "run", folder / "page")
    shirt = np.full((300, 240), 238, np.uint8)
    shirt[40:260, 60:180] = 60  # body
    shirt[40:120, 10:230] = 60  # sleeves
    Image.fromarray(shirt).save(folder / "shirt.png")

    process, url = static_server(page_dir)
    try:
        watched = Watched(browser, url)
        page = watched.page
        expect(page.locator("#draw-title")).to_have_text("Draw a clothing item")
        expect(page.locator("#run-info")).to_contain_text("Fashion-MNIST")
        labels = page.eval_on_selector_all("#bars .bar-label", "ls => ls.map(l => l.textContent)")
        assert labels == list(load_dataset("fashion-mnist").classes)
        watched.wait_until_ready()
        page.set_input_files("#file", str(folder / "shirt.png"))
        expect(page.locator("#source")).to_have_text("shirt.png")
        shown = watched.answer()
        screenshot(page, "web-export-fashion.png")
        assert not watched.errors, watched.errors
        watched.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
    record = predicted(folder / "run", [folder / "shirt.png"], folder)[0]
    assert_same_answer(shown, record, "shirt.png")
    rows = np.flatnonzero(shown["seen"].max(1))
    assert rows[0] == 0 and rows[-1] == 27  # the item fills the frame, as Fashion-MNIST's do


# --- serve: the same page, answering in the browser as well ---------------------------------


def test_serve_can_answer_in_the_browser_as_well(browser, live_server):
    from playwright.sync_api import expect

    config = json.loads(_get(f"{live_server}/model.json"))
    if config["browser"] is None:
        pytest.skip(f"serve cannot answer in the browser here: {config.get('browser_note')}")
    watched = Watched(browser, f"{live_server}/?mode=browser")
    page = watched.page
    # the choice appears once the page has fetched its model.json: wait for it
    expect(page.locator("#mode")).to_be_visible()
    expect(page.locator("input[value=browser]")).to_be_checked()
    watched.wait_until_ready()
    draw(page, 3)
    expect(page.locator("body")).to_have_attribute("data-answered-by", "browser")
    expect(page.locator("#top-class")).to_have_text("3")
    page.wait_for_timeout(300)
    here = watched.answer()
    page.check("input[value=server]")  # the same drawing, answered again by the server
    expect(page.locator("body")).to_have_attribute("data-answered-by", "server")
    there = watched.answer()
    assert here["class_name"] == there["class_name"] == "3"
    assert np.array_equal(here["seen"], there["seen"])
    assert (
        np.abs(here["probabilities"] - there["probabilities"]).max() <= MAX_PROBABILITY_DIFFERENCE
    )
    page.check("#layers")  # the server's 28x28, its stages computed here
    expect(page.locator(".stage-maps")).to_have_count(3)
    screenshot(page, "serve-browser-layers.png")
    assert all(url.startswith(live_server) for url in watched.requests), watched.requests
    assert not watched.errors, watched.errors
    watched.close()


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()
