"""Why a path the user chose cannot be written, in words they can act on."""

from __future__ import annotations

import os
from pathlib import Path

from mnist_cnn.errors import UserError


def blocking_file(path: str | os.PathLike) -> Path | None:
    """The file that stands where a folder above `path` would have to be, if any."""
    for parent in Path(path).parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def cannot_write(
    path: str | os.PathLike, exc: OSError, fix: str = "choose another path"
) -> UserError:
    """The one-line error for an output `path` that the file system refused (`exc`)."""
    path = Path(path)
    blocker = blocking_file(path)
    if path.is_dir():
        reason = "it is a folder: give a file name"
    elif blocker is not None:
        reason = f"{blocker} is a file, not a folder"
    else:
        reason = exc.strerror or str(exc)
    return UserError(f"cannot write {path} ({reason}): {fix}")


def check_output(path: str | os.PathLike | None, fix: str, folder: bool = False) -> None:
    """Refuse, before any work, an output path that can never be written: one under a file,
    a folder where a file is wanted, or (`folder`) a file where a folder is wanted."""
    if path is None:
        return
    path = Path(path)
    blocker = blocking_file(path)
    if blocker is not None:
        raise UserError(f"cannot write {path} ({blocker} is a file, not a folder): {fix}")
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"cannot write into {path} (it is a file, not a folder): {fix}")
    if not folder and path.is_dir():
        raise UserError(f"cannot write {path} (it is a folder: give a file name): {fix}")
