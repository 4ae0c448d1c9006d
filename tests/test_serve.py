"""The web app's API: the answers of `predict --json`, its limits, its errors, concurrency.

The app runs in this process on uvicorn, on 127.0.0.1 (`live_server`); `mnist-cnn serve`
itself runs as a subprocess for what only the command line does.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digit_strokes import draw_digit, photo_like
from mnist_cnn.images import MAX_PIXELS, load_image

httpx = pytest.importorskip("httpx", reason="the API tests need httpx (dev extra)")
pytest.importorskip("fastapi", reason="the web app needs the serve extra")

MB = 2**20


@pytest.fixture(scope="module")
def api(live_server):
    with httpx.Client(base_url=live_server, timeout=30) as client:
        yield client


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photos(n: int, seed: int = 7) -> list[tuple[str, bytes]]:
    """Digits as people might photograph them: sized, placed, tilted, coloured variously."""
    rng = np.random.default_rng(seed)
    pictures = []
    for i in range(n):
        digit = i % 10
        picture = photo_like(digit, rng)
        fmt, suffix = ("JPEG", "jpg") if i % 3 == 0 else ("PNG", "png")
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt)
        pictures.append((f"digit-{i}-{digit}.{suffix}", buffer.getvalue()))
    return pictures


@pytest.fixture(scope="module")
def photo_files(trained_run, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """Twelve photo files, and what `predict --json` prints for them by file name."""
    folder = tmp_path_factory.mktemp("photos")
    for name, data in photos(12):
        (folder / name).write_bytes(data)
    names = sorted(p.name for p in folder.iterdir())
    done = subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "predict", str(trained_run), *names, "--json"],
        cwd=folder, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    return folder, {r["input"]: r for r in records}


def without_seen(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seen"}


def assert_error(response, status: int, words: str = "") -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert isinstance(message, str) and message
    assert words.lower() in message.lower(), message


# --- the answers ------------------------------------------------------------------------------


def test_health_and_model_summary(api, trained_run):
    assert api.get("/healthz").status_code == 200
    info = api.get("/api/model").json()
    summary = json.loads((trained_run / "summary.json").read_text())
    assert {k: info[k] for k in summary} == summary
    assert info["classes"] == [str(i) for i in range(10)]
    assert info["style"] == "digit" and info["run"] == trained_run.name


def test_uploaded_photos_get_the_answers_of_predict_json(api, photo_files):
    folder, expected = photo_files
    for name, record in expected.items():
        data = (folder / name).read_bytes()
        response = api.post("/api/predict", files={"file": (name, data, "image/png")})
        assert response.status_code == 200, response.text
        assert without_seen(response.json()) == record


def test_json_base64_and_raw_bodies_answer_the_same(api, photo_files):
    folder, expected = photo_files
    name = next(iter(expected))
    data = (folder / name).read_bytes()
    encoded = base64.b64encode(data).decode()
    as_json = api.post("/api/predict", json={"image": encoded, "name": name})
    assert without_seen(as_json.json()) == expected[name]
    as_url = api.post("/api/predict", json={"image": "data:image/png;base64," + encoded})
    as_body = raw(api, data, "image/png")
    for response in (as_url, as_body):
        assert response.status_code == 200
        assert without_seen(response.json()) == {**expected[name], "input": "upload"}


def test_the_answer_shows_the_28x28_image_the_model_saw(api, photo_files):
    folder, expected = photo_files
    name = next(iter(expected))
    path = folder / name
    record = api.post("/api/predict", files={"file": (name, path.read_bytes())}).json()
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(record["seen"]))))
    assert seen.shape == (28, 28) and seen.dtype == np.uint8
    assert np.array_equal(seen, load_image(path).numpy())


def test_top_k_covers_every_class_when_asked(api, photo_files):
    folder, expected = photo_files
    name = next(iter(expected))
    data = (folder / name).read_bytes()
    record = api.post("/api/predict?top_k=10", files={"file": (name, data)}).json()
    assert sorted(t["class_index"] for t in record["top_k"]) == list(range(10))
    assert abs(sum(t["probability"] for t in record["top_k"]) - 1) < 1e-4
    assert_error(api.post("/api/predict?top_k=0", files={"file": (name, data)}), 422, "top_k")


# --- limits and bad requests: a JSON error each, and the server carries on -------------------


def test_bodies_over_2_mb_get_413(api, live_server):
    big = os.urandom(2 * MB + 1)
    # A client that sends the whole body before it reads the answer still gets the 413.
    request = urllib.request.Request(f"{live_server}/api/predict", data=big * 3,
                                     headers={"content-type": "image/png"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413 and "2 MB" in json.loads(refused.value.read())["error"]
    assert_error(api.post("/api/predict", files={"file": ("big.png", big)}), 413, "2 MB")
    assert_error(raw(api, big, "image/png"), 413, "2 MB")

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(3):
            yield big[:MB]

    chunked = api.post("/api/predict", content=chunks(), headers={"content-type": "image/png"})
    assert_error(chunked, 413, "2 MB")
    assert api.get("/healthz").status_code == 200


def raw(api, body: bytes, content_type: str):
    return api.post("/api/predict", content=body, headers={"content-type": content_type})


def test_non_images_get_415_or_400(api):
    text = b"this is not a picture"
    assert_error(api.post("/api/predict", files={"file": ("a.png", text)}), 415, "not an image")
    assert_error(raw(api, text, "text/plain"), 415, "content type")
    assert_error(raw(api, b"", "image/png"), 400, "empty")
    assert_error(raw(api, b"{", "application/json"), 400, "JSON")
    assert_error(api.post("/api/predict", json={"image": "%%%"}), 400, "base64")
    assert_error(api.post("/api/predict", json={"picture": "abc"}), 400, '"image"')
    assert_error(api.post("/api/predict", data={"note": "no file"}, files={"x": ("", b"")}), 400)
    assert_error(raw(api, b"--x\r\nbroken", "multipart/form-data; boundary=x"), 400)
    cut = png_bytes(draw_digit(4, 120))[:150]
    assert_error(api.post("/api/predict", files={"file": ("cut.png", cut)}), 415)
    assert_error(api.get("/api/nothing-here"), 404)
    assert_error(api.get("/api/predict"), 405)
    assert api.get("/healthz").status_code == 200


def test_images_it_cannot_answer_for_say_why(api):
    blank = png_bytes(Image.new("RGB", (200, 200), (240, 240, 240)))
    assert_error(api.post("/api/predict", files={"file": ("blank.png", blank)}), 422, "no ink")
    side = int(MAX_PIXELS**0.5) + 100
    bomb = png_bytes(Image.new("1", (side, side)))  # small on the wire, huge when decoded
    assert len(bomb) < 2 * MB
    assert_error(api.post("/api/predict", files={"file": ("bomb.png", bomb)}), 413, "pixel")


# --- concurrency ------------------------------------------------------------------------------


def test_concurrent_requests_get_the_answers_of_one_at_a_time(live_server, photo_files):
    folder, expected = photo_files
    names = list(expected)
    jobs = [names[i % len(names)] for i in range(96)]

    def ask(name):
        with httpx.Client(base_url=live_server, timeout=60) as client:
            data = (folder / name).read_bytes()
            return name, client.post("/api/predict", files={"file": (name, data)})

    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(ask, jobs))
    for name, response in answers:
        assert response.status_code == 200, response.text
        assert without_seen(response.json()) == expected[name]


# --- the page and its assets --------------------------------------------------------------------


def test_the_page_loads_nothing_from_elsewhere(api):
    page = api.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        response = api.get(asset)
        assert response.status_code == 200 and len(response.text) > 500
    for text in (page.text, api.get("/static/app.js").text, api.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


# --- the command ----------------------------------------------------------------------------


def test_serve_prints_its_address_and_stops_on_ctrl_c(trained_run, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_cnn", "serve", str(trained_run), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, process.stderr.read())
        url = line.split(" at ")[1].split()[0]
        deadline = time.monotonic() + 20
        while True:
            try:
                assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.1)
        assert "test accuracy" in line
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=20)
    assert code == 130  # the contract's code for an interrupted command
    assert "Traceback" not in process.stderr.read()


def test_serve_refuses_what_it_cannot_do_in_one_line(run_cli, trained_run, tmp_path):
    code, _, err = run_cli("serve", tmp_path / "no-such-run", "--port", "0")
    assert code == 2 and "not a folder" in err and len(err.strip().splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli("serve", trained_run, "--port", port)
    assert code == 2 and f":{port}" in err and "--port" in err
    assert len(err.strip().splitlines()) == 1


def test_serve_without_the_web_stack_names_the_extra(trained_run, tmp_path):
    script = (
        "import sys; sys.modules['fastapi'] = None\n"  # as if FastAPI were not installed
        "from mnist_cnn.cli import main\n"
        f"sys.exit(main(['serve', {str(trained_run)!r}, '--port', '0']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "pip install 'mnist-cnn[serve]'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- the load benchmark -------------------------------------------------------------------------


def test_the_load_benchmark_reports_and_checks_every_answer(live_server, trained_run, capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    args = ["--run-dir", str(trained_run), "--url", live_server, "--requests", "60",
            "--concurrency", "6", "--images", "12", "--timeout-s", "60", "--json"]  # fmt: skip
    assert serve_load.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] == 60 and result["errors"] == 0 and result["mismatches"] == 0
    assert result["throughput_rps"] > 0 and 0 < result["p50_ms"] <= result["p99_ms"]


def test_a_stop_by_signal_is_exit_130_even_when_asyncio_swallows_the_raised_signal(
    trained_run, monkeypatch, capsys
):
    """uvicorn raises the caught Ctrl-C again after shutting down, but asyncio's runner can
    turn it into the cancellation of a task that has just finished and return normally."""
    import uvicorn

    from mnist_cnn.cli import main

    def run_then_return_as_if_the_signal_was_lost(self, sockets=None):
        self.handle_exit(signal.SIGINT, None)  # what uvicorn's signal handler does
        assert self.should_exit

    monkeypatch.setattr(uvicorn.Server, "run", run_then_return_as_if_the_signal_was_lost)
    assert main(["serve", str(trained_run), "--port", "0"]) == 130
    assert "interrupted" in capsys.readouterr().err
