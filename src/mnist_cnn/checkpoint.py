"""checkpoint.pt: everything `train --resume` needs, written so that it never lies.

Written atomically (temp file, fsync, rename): a process killed at any moment leaves
either the previous complete checkpoint or the new one. Read with
`torch.load(weights_only=True)`, which refuses pickles that name arbitrary code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

from mnist_cnn.errors import UserError

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


def save_checkpoint(path: Path, state: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (the directory entry), where the OS allows it."""
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


def load_checkpoint(path: Path) -> dict:
    """The checkpoint's contents; a clear UserError for anything missing, torn or hostile."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: nothing to resume (the run has no checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise UserError(f"{path}: refused, not a plain checkpoint ({first[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a checkpoint of this version of mnist-cnn")
    return state
