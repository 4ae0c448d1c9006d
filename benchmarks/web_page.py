"""The exported page's weight and its time to a first prediction, in headless Chromium.

    python benchmarks/web_page.py --run-dir runs/mnist-seed [--loads 7] [--page DIR]

Exports the run with `mnist-cnn export --format web` (or takes an exported --page DIR),
serves the folder with `python -m http.server` on 127.0.0.1, and opens it --loads times,
each in a fresh browser context (empty cache, as a first visit). In each load a digit is
drawn with the mouse as soon as the page's script has run, and the page's own performance
marks give, from the start of navigation:
- ready: onnxruntime-web and the model loaded, the page able to answer;
- first answer: the drawing's prediction shown (the drawing is done by then).
Then one more digit, drawn once the page is ready, measures predictions alone (the
page's own measure: the canvas read, prepared, run through the model, the answer shown). Page
weight is every response body the page received, uncompressed (http.server compresses
nothing). Prints a Markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from digit_strokes import strokes_in_box  # noqa: E402  (a helper of the tests, not a package)

CHROMIUM = os.environ.get("MNIST_CNN_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run"]  # fmt: skip
MARKS = """() => Object.fromEntries(['mnist-cnn:ready', 'mnist-cnn:answer'].map(
    (name) => [name, performance.getEntriesByName(name).map((m) => m.startTime)]))"""
MEASURES = "() => performance.getEntriesByName('mnist-cnn:prediction').map((m) => m.duration)"
BODIES = """() => performance.getEntriesByType('navigation').concat(
    performance.getEntriesByType('resource')).map((e) => [e.name, e.decodedBodySize,
                                                          e.responseEnd])"""


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", str(folder), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}/"
        except OSError:
            time.sleep(0.05)
    raise SystemExit("python -m http.server did not start")


def draw(page, digit: int, left: float = 0.28) -> None:
    box = page.locator("#canvas").bounding_box()
    w, h = box["width"], box["height"]
    frame = (box["x"] + left * w, box["y"] + 0.15 * h, 0.44 * w, 0.7 * h)
    for stroke in strokes_in_box(digit, frame):
        page.mouse.move(*stroke[0])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(x, y)
        page.mouse.up()


def wait_for(page, predicate: str, timeout_s: float) -> None:
    """Poll a function in the page (wait_for_function would need the page to allow eval)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(predicate):
        if time.monotonic() > deadline:
            raise SystemExit(f"the page did not answer within {timeout_s} s")
        time.sleep(0.005)


def one_load(browser, url: str) -> dict:
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    page.goto(url, wait_until="domcontentloaded")
    draw(page, 7)
    wait_for(page, "() => performance.getEntriesByName('mnist-cnn:answer').length > 0", 60)
    marks = page.evaluate(MARKS)
    bodies = page.evaluate(BODIES)
    # Predictions alone (picture read, prepared, run, shown), once the page is ready.
    page.keyboard.press("Escape")
    before = len(page.evaluate(MEASURES))
    draw(page, 1, left=0.3)
    wait_for(page, f"() => performance.getEntriesByName('mnist-cnn:prediction').length > {before}"
             " && !document.getElementById('canvas').matches(':active')", 10)  # fmt: skip
    page.wait_for_timeout(300)  # the stroke's last answer
    durations = page.evaluate(MEASURES)[before:]
    context.close()
    return {
        "ready_ms": marks["mnist-cnn:ready"][0],
        "first_answer_ms": marks["mnist-cnn:answer"][0],
        "prediction_ms": statistics.median(durations),
        "fetched_ms": max(end for _, _, end in bodies),
        "bytes": sum(size for _, size, _ in bodies),
        "requests": len(bodies),
        "files": bodies,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="a trained run to export")
    parser.add_argument("--page", type=Path, help="an already exported folder instead")
    parser.add_argument("--loads", type=int, default=7)
    args = parser.parse_args()
    if (args.run_dir is None) == (args.page is None):
        parser.error("give --run-dir or --page")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="mnist-cnn-web-") as tmp:
        folder = args.page
        if folder is None:
            folder = Path(tmp) / "page"
            subprocess.run([sys.executable, "-m", "mnist_cnn", "export", str(args.run_dir),
                            "--format", "web", "--out", str(folder)],
                           check=True, stdout=sys.stderr)  # fmt: skip
        on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        process, url = serve(folder)
        load_before = os.getloadavg()[0]
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
                version = browser.version
                loads = [one_load(browser, url) for _ in range(args.loads)]
                browser.close()
        finally:
            process.terminate()
            process.wait(timeout=10)
        load_after = os.getloadavg()[0]

    def row(name: str, key: str) -> str:
        values = [load[key] for load in loads]
        digits = 1 if max(values) < 100 else 0
        return (f"| {name} | {statistics.median(values):.{digits}f} | "
                f"{min(values):.{digits}f} | {max(values):.{digits}f} |")  # fmt: skip

    first = loads[0]
    print(f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: the exported web page "
          "(benchmarks/web_page.py)\n")  # fmt: skip
    print(f"- Command: `.venv/bin/python benchmarks/web_page.py "
          f"{'--run-dir ' + str(args.run_dir) if args.run_dir else '--page ' + str(args.page)} "
          f"--loads {args.loads}`")  # fmt: skip
    print(f"- Machine: {platform.machine()}, {os.cpu_count()} cores, Chromium {version} "
          f"headless (--disable-gpu), Python {platform.python_version()}; load average "
          f"{load_before:.1f} before, {load_after:.1f} after")  # fmt: skip
    print(f"- Page weight: {first['bytes'] / 1e6:.2f} MB in {first['requests']} responses, "
          f"uncompressed ({on_disk / 1e6:.2f} MB on disk); budget 16 MB")  # fmt: skip
    for name, size, _ in sorted(first["files"], key=lambda f: -f[1]):
        print(f"  - `{name.removeprefix(url) or 'index.html'}`: {size:,} bytes")
    print(f"\n| from the start of navigation, ms ({args.loads} fresh loads) | median | min | max |")
    print("| --- | ---: | ---: | ---: |")
    print(row("every file received", "fetched_ms"))
    print(row("ready (runtime started, model loaded)", "ready_ms"))
    print(row("first answer (digit drawn at once)", "first_answer_ms"))
    print(row("a prediction once ready (picture read, prepared, run, shown)", "prediction_ms"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
