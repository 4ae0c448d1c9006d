"""The web page in real headless Chromium: draw a digit stroke by stroke, drop and upload photos.

Chromium is Debian's (`make test` installs it through `make browser`); Playwright for
Python drives it. Screenshots are kept in tests/artifacts/ (not committed).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from digit_strokes import draw_digit, strokes_in_box

CHROMIUM = Path(os.environ.get("MNIST_CNN_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
LAUNCH_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is missing: pip install -e '.[dev]'"
    )
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing and could not be installed "
                    "(`make browser` installs Debian's chromium as root with apt-get)")  # fmt: skip
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server):
    """The page, checked afterwards for script errors and for requests to anywhere else."""
    page = browser.new_page(viewport={"width": 1000, "height": 860})
    page.set_default_timeout(TIMEOUT_MS)
    elsewhere, errors = [], []
    local = (live_server, "data:", "blob:")
    page.on("request", lambda r: None if r.url.startswith(local) else elsewhere.append(r.url))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(live_server)
    yield page
    page.close()
    assert not elsewhere, f"the page asked for something from elsewhere: {elsewhere}"
    assert not errors, f"the page reported errors: {errors}"


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True, animations="disabled")
    print(f"screenshot: {path}")
    return path


def draw(page, digit: int) -> None:
    """Draw `digit` on the canvas with the mouse, stroke by stroke, as a person would."""
    box = page.locator("#canvas").bounding_box()
    w, h = box["width"], box["height"]
    frame = (box["x"] + 0.28 * w, box["y"] + 0.15 * h, 0.44 * w, 0.7 * h)
    for stroke in strokes_in_box(digit, frame):
        page.mouse.move(*stroke[0])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(x, y, steps=3)
        page.mouse.up()


def test_draw_a_digit_then_clear_then_upload_a_photo(page, tmp_path):
    from playwright.sync_api import expect

    expect(page.locator("#run-info")).to_contain_text("test accuracy")
    expect(page.locator("#run-info")).to_contain_text("MNIST")
    expect(page.locator("#bars li")).to_have_count(10)

    draw(page, 3)
    expect(page.locator("#top-class")).to_have_text("3")
    expect(page.locator("#seen")).to_be_visible()
    expect(page.locator("#bars li.top .bar-label")).to_have_text("3")
    screenshot(page, "serve-drawn-3.png")

    page.keyboard.press("Escape")
    expect(page.locator("#top-class")).to_have_text("–")
    expect(page.locator("#seen")).to_be_hidden()

    photo = tmp_path / "seven.jpg"
    draw_digit(7, 320, angle=5).save(photo)
    page.set_input_files("#file", str(photo))
    expect(page.locator("#top-class")).to_have_text("7")
    expect(page.locator("#source")).to_have_text("seven.jpg")
    screenshot(page, "serve-page.png")


def test_a_dropped_photo_is_predicted_and_the_page_fits_a_phone(page, tmp_path):
    from playwright.sync_api import expect

    photo = tmp_path / "four.png"
    draw_digit(4, 240).save(photo)
    encoded = base64.b64encode(photo.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "four.png", { type: "image/png" }));
            return transfer;
        }""",
        encoded,
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    expect(page.locator("#top-class")).to_have_text("4")

    page.set_viewport_size({"width": 390, "height": 844})
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone's screen"
    canvas = page.locator("#canvas").bounding_box()
    assert canvas["width"] >= 300 and abs(canvas["width"] - canvas["height"]) < 1
    screenshot(page, "serve-phone.png")
