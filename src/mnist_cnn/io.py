"""The one atomic write: every file the project writes goes through here.

A temp file beside the target (same folder, so the rename never crosses file systems),
written, flushed and fsynced, renamed over the target, then the folder fsynced so the
rename itself survives a power cut. A process killed at any moment leaves either the old
file or the complete new one, plus at most a hidden temp file that `clear_leftovers`
recognises by its name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Temp files are `.<target name>.<random>.partial`: hidden, and never a name the project
# writes on purpose, so `clear_leftovers` can remove them without a list of targets.
TEMP_SUFFIX = ".partial"


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames in `folder` durable, where the OS allows it (not every one does)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that wants a file name (matplotlib,
    safetensors, onnx); on success it is fsynced and renamed to `path`, on failure removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, mode)  # after the writer: some (safetensors) replace the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | bytearray, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half."""
    with atomic_path(path, mode) as tmp, open(tmp, "wb") as f:
        f.write(data)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and fsync it: a crash leaves at most a torn last line, which
    readers of line files skip."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line if line.endswith("\n") else line + "\n")
        f.flush()
        os.fsync(f.fileno())


def clear_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files that writes cut short by a kill left in `folder`."""
    removed = []
    for leftover in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover)
    # Earlier versions named their temp files `.*.tmp`.
    for leftover in Path(folder).glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed
