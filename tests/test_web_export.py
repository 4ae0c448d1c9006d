"""`export --format web` without a browser: the runtime's provisioning (from a registry on
127.0.0.1, never the internet), the exported folder, its model's stage outputs, and the
image preparation in JavaScript against Python's (with Node, where it is installed)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import shutil
import subprocess
import tarfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from digit_strokes import draw_digit, photo_like
from mnist_cnn import web
from mnist_cnn.errors import UserError
from mnist_cnn.images import prepare_array

PREPARE_JS = Path(web.STATIC / "prepare.js")


# --- a package registry on 127.0.0.1 ------------------------------------------------------------


@contextmanager
def registry(files: dict[str, bytes], headers: dict[str, str] | None = None):
    """An HTTP server on 127.0.0.1 answering GET /PATH from `files`; yields (base URL, hits)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def tarball(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fake_spec(data: bytes, module: bytes, wasm: bytes) -> web.RuntimeSpec:
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    return web.RuntimeSpec(
        package="fake-runtime",
        version="1.0.0",
        integrity=integrity(data),
        files={"rt.mjs": ("rt.js", sha(module)), "rt.wasm": ("rt.wasm", sha(wasm))},
        module="rt.js",
    )


MODULE, WASM = b"export const x = 1;\n", b"\0asm\1\0\0\0" + bytes(range(256)) * 40
PACKAGE = tarball({
    "package/package.json": b"{}",
    "package/dist/rt.mjs": MODULE,
    "package/dist/rt.wasm": WASM,
    "package/dist/other.js": b"not wanted",
})  # fmt: skip


def test_the_runtime_is_downloaded_verified_cached_and_then_used_offline(
    isolated_cache, monkeypatch
):
    spec = fake_spec(PACKAGE, MODULE, WASM)
    path = f"fake-runtime/-/{spec.tarball_name}"
    with registry({path: PACKAGE}) as (url, hits):
        monkeypatch.setenv("MNIST_CNN_NPM_REGISTRY", url)
        folder = web.provision_runtime(spec)
    assert hits == [f"/{path}"]
    assert folder == isolated_cache / "web" / "fake-runtime-1.0.0"
    assert sorted(p.name for p in folder.iterdir()) == ["rt.js", "rt.wasm"]  # nothing else
    assert (folder / "rt.wasm").read_bytes() == WASM
    assert (isolated_cache / "web" / spec.tarball_name).read_bytes() == PACKAGE
    # Offline now: the cache answers; a damaged file is rebuilt from the kept tarball.
    monkeypatch.setenv("MNIST_CNN_NPM_REGISTRY", "none")
    assert web.provision_runtime(spec) == folder
    (folder / "rt.js").write_bytes(b"tampered")
    assert web.cached_runtime(spec) is None
    assert web.provision_runtime(spec) == folder and (folder / "rt.js").read_bytes() == MODULE


def test_a_tarball_that_is_not_the_published_one_is_refused(isolated_cache, monkeypatch):
    spec = fake_spec(PACKAGE, MODULE, WASM)
    evil = tarball({
        "package/dist/rt.mjs": MODULE, "package/dist/rt.wasm": WASM,
        "package/dist/../../../escape.txt": b"outside",
    })  # fmt: skip
    with registry({f"fake-runtime/-/{spec.tarball_name}": evil}) as (url, _):
        monkeypatch.setenv("MNIST_CNN_NPM_REGISTRY", url)
        with pytest.raises(UserError, match="integrity") as caught:
            web.provision_runtime(spec)
    assert "python -m mnist_cnn.web fetch" in str(caught.value)
    assert not (isolated_cache / "web" / "fake-runtime-1.0.0").exists()
    assert not list(isolated_cache.rglob("escape.txt"))


def test_extraction_takes_only_the_named_regular_files():
    # With a matching integrity (as a crafted tarball would have if the pin were wrong),
    # traversal names are never written anywhere and a link is not followed.
    files = {"package/dist/rt.mjs": MODULE, "package/dist/rt.wasm": WASM, "../escape": b"x"}
    spec = fake_spec(b"", MODULE, WASM)
    assert set(web.extract_runtime(tarball(files), spec)) == {"rt.mjs", "rt.wasm"}
    linked = tarball({"package/dist/rt.mjs": MODULE}, links={"package/dist/rt.wasm": "/etc/passwd"})
    with pytest.raises(UserError, match="not a regular file"):
        web.extract_runtime(linked, spec)
    wrong = tarball({"package/dist/rt.mjs": MODULE, "package/dist/rt.wasm": WASM + b"!"})
    with pytest.raises(UserError, match="sha256"):
        web.extract_runtime(wrong, spec)
    with pytest.raises(UserError, match="not a readable package tarball"):
        web.extract_runtime(b"not a tarball", spec)


def test_downloads_are_bounded():
    claims = {"Content-Length": str(10**12)}
    with registry({"big": b"x" * 1000}, claims) as (url, _), pytest.raises(UserError, match="over"):
        web.download(f"{url}/big")
    with registry({"big": b"x" * 5000}) as (url, _):
        with pytest.raises(UserError, match="1,000"):
            web.download(f"{url}/big", max_bytes=1000)
        with pytest.raises(UserError, match="404"):
            web.download(f"{url}/missing")


def test_the_real_runtime_comes_through_a_local_registry(tmp_path, monkeypatch):
    kept = web.web_cache() / web.ORT.tarball_name  # the developer's cache, before isolating
    if not kept.is_file():
        pytest.skip(f"{kept} is not there: `make setup` (python -m mnist_cnn.web fetch) keeps it")
    monkeypatch.setenv("MNIST_CNN_CACHE", str(tmp_path / "cache"))
    with registry({f"onnxruntime-web/-/{web.ORT.tarball_name}": kept.read_bytes()}) as (url, _):
        monkeypatch.setenv("MNIST_CNN_NPM_REGISTRY", url)
        folder = web.provision_runtime()
    assert folder == tmp_path / "cache" / "web" / "onnxruntime-web-1.30.0"
    assert web.cached_runtime() == folder
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert set(sizes) == {"ort.wasm.bundle.min.js", "ort-wasm-simd-threaded.wasm"}
    assert sum(sizes.values()) < 15_000_000


def test_without_the_runtime_or_a_network_export_says_how_to_provide_it(
    run_cli, trained_run, isolated_cache, closed_port_url, tmp_path
):
    code, out, err = run_cli("export", trained_run, "--format", "web", "--out", tmp_path / "page",
                             env={"MNIST_CNN_NPM_REGISTRY": closed_port_url})  # fmt: skip
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "onnxruntime-web 1.30.0" in err and "--runtime" in err and "mnist_cnn.web fetch" in err
    assert not (tmp_path / "page").exists()
    with pytest.raises(UserError, match="cannot read it"):
        web.provision_runtime(tarball=tmp_path / "no.tgz")


# --- the exported folder ------------------------------------------------------------------------


def test_the_exported_folder_is_the_page_its_model_and_the_runtime(web_export, trained_run):
    files = sorted(str(p.relative_to(web_export)) for p in web_export.rglob("*") if p.is_file())
    assert files == [
        "index.html", "model.json", "model.onnx", "ort/ort-wasm-simd-threaded.wasm",
        "ort/ort.wasm.bundle.min.js", "static/app.js", "static/prepare.js", "static/style.css",
    ]  # fmt: skip
    total = sum((web_export / f).stat().st_size for f in files)
    assert total < 16_000_000, total  # the page's weight budget
    # The same page `serve` sends, forbidding requests to anywhere else.
    assert (web_export / "index.html").read_bytes() == (web.STATIC / "index.html").read_bytes()
    html = (web_export / "index.html").read_text()
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    config = json.loads((web_export / "model.json").read_text())
    summary = json.loads((trained_run / "summary.json").read_text())
    assert config["api"] is None
    assert config["classes"] == [str(i) for i in range(10)] and config["style"] == "digit"
    assert config["test_accuracy"] == summary["test_accuracy"] and config["recipe"] == "seed"
    assert config["preparation"]["digit_box"] == 20 and config["preparation"]["size"] == 28
    assert config["browser"]["stages"] == ["stage1", "stage2", "stage3"]


def test_the_exported_model_gives_the_stage_maps_explain_draws(web_export, trained_run):
    ort = pytest.importorskip("onnxruntime")
    from mnist_cnn.explain import stage_outputs
    from mnist_cnn.run import Run

    model = Run(trained_run).load_model()
    image = prepare_array(np.asarray(draw_digit(5, 200).convert("L"), dtype=np.float32))
    session = ort.InferenceSession(
        str(web_export / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    x = (image.float() / 255)[None, None].numpy()
    probs, *maps = session.run(None, {"images": x})
    expected = stage_outputs(model, image)
    assert [m.shape[1:] for m in maps] == [tuple(e.shape) for _, e in expected]
    for got, (_, want) in zip(maps, expected, strict=True):
        assert np.abs(got[0] - want.numpy()).max() < 1e-4
    with torch.inference_mode():
        want = torch.softmax(model((image.float() / 255)[None, None]), 1).numpy()
    assert np.abs(probs - want).max() < 1e-5


# --- prepare.js against mnist_cnn.images, in Node -------------------------------------------


def node_prepare(cases: list[tuple[str, np.ndarray, str]]) -> list:
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node here: the browser test checks prepare.js instead")
    script = (
        f"const P = require({json.dumps(str(PREPARE_JS))});"
        "let s = ''; process.stdin.on('data', (d) => (s += d)); process.stdin.on('end', () => {"
        "  const out = JSON.parse(s).map((c) => { try {"
        "    return Array.from(P.prepare({ w: c.w, h: c.h, data: Float32Array.from(c.data) },"
        "                                c.style, c.name));"
        "  } catch (e) { return e.message; } });"
        "  process.stdout.write(JSON.stringify(out)); });"
    )
    payload = [
        {"name": n, "w": a.shape[1], "h": a.shape[0], "style": s, "data": a.ravel().tolist()}
        for n, a, s in cases
    ]
    done = subprocess.run([node, "-e", script], input=json.dumps(payload), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_prepare_js_gives_the_28x28_python_gives(tmp_path):
    rng = np.random.default_rng(3)
    gray = lambda im: np.asarray(im.convert("L"), dtype=np.float32)  # noqa: E731
    cases = [(f"photo-{i}", gray(photo_like(i % 10, rng)), "digit") for i in range(40)]
    cases += [(f"drawn-{d}", gray(draw_digit(d, 300 + 37 * d)), "digit") for d in range(10)]
    cases.append(("light-on-dark", 255 - gray(draw_digit(4, 180)), "digit"))
    small = np.zeros((28, 28), np.float32)
    small[5:20, 9:17] = 200
    cases.append(("mnist-like", small, "digit"))
    for i in range(8):  # a dark item on light paper, any shape: clothes fill the frame
        item = np.full((int(rng.integers(40, 300)), int(rng.integers(40, 300))), 235, np.float32)
        h, w = item.shape
        item[h // 6 : h - h // 5, w // 4 : w - w // 7] = rng.integers(20, 120)
        cases.append((f"item-{i}", np.clip(item + rng.normal(0, 6, item.shape), 0, 255), "fashion"))
    cases.append(("blank", np.full((50, 60), 240, np.float32), "digit"))
    for (name, array, style), got in zip(cases, node_prepare(cases), strict=True):
        try:
            want = prepare_array(array, style, name).numpy().ravel().tolist()
        except UserError as exc:
            want = str(exc)
        assert got == want, name
