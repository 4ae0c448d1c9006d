"""checkpoint.pt: the training state, written and read here and nowhere else.

One schema: the position and running sums of training (`TrainState`), the weights, the
optimizer's state, and the identity of the run it belongs to (data set, classes, recipe,
model, seed). Written atomically (`mnist_cnn.io`), read with
`torch.load(weights_only=True)`, which refuses pickles that name arbitrary code, and
validated on read: a missing key, or a checkpoint of another run, is one clear error.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mnist_cnn.errors import UserError
from mnist_cnn.io import atomic_path

CHECKPOINT = "checkpoint.pt"
FORMAT = 2
KEYS = ("format", "identity", "state", "model", "optimizer")
# What makes two runs the same run: a checkpoint resumes only the run it was written for.
IDENTITY = ("dataset", "classes", "recipe", "seed")
# The largest model's checkpoint is a few MB: anything past this is not one of ours.
MAX_BYTES = 256 * 1024 * 1024


@dataclass
class TrainState:
    """Where training stands: what a resumed run needs besides weights and optimizer."""

    step: int = 0  # optimizer steps taken
    train_seconds: float = 0.0  # training time so far, evaluations excluded
    last_eval_at: float = 0.0  # train_seconds at the last evaluation
    loss_sum: float = 0.0  # training loss summed since the last evaluation
    loss_count: int = 0  # steps in that sum
    history: list[dict] = field(default_factory=list)  # one row per evaluation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str) -> TrainState:
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in values]
        if missing:
            raise UserError(f"{where}: its training state lacks {', '.join(missing)}")
        return cls(**{name: values[name] for name in names})


@dataclass
class Checkpoint:
    identity: dict
    state: TrainState
    model: dict
    optimizer: dict


def run_identity(config: dict) -> dict:
    """The part of a run's config that a checkpoint must match."""
    return {key: config.get(key) for key in IDENTITY}


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    payload = {
        "format": FORMAT,
        "identity": checkpoint.identity,
        "state": checkpoint.state.to_dict(),
        "model": checkpoint.model,
        "optimizer": checkpoint.optimizer,
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: Path, identity: dict | None = None) -> Checkpoint:
    """The checkpoint at `path`; with `identity` (see `run_identity`), refused unless it
    was written by that run. A clear UserError for anything missing, torn or hostile."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: nothing to resume (the run has no checkpoint)")
    payload = _load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a checkpoint of this version of mnist-cnn")
    missing = [key for key in KEYS if key not in payload]
    if missing or not isinstance(payload["state"], dict):
        raise UserError(f"{path}: incomplete checkpoint (lacks {', '.join(missing) or 'state'})")
    if identity is not None:
        _check_identity(path, payload["identity"], identity)
    return Checkpoint(
        identity=payload["identity"],
        state=TrainState.from_dict(payload["state"], str(path)),
        model=payload["model"],
        optimizer=payload["optimizer"],
    )


def _load(path: Path):
    try:
        if path.stat().st_size > MAX_BYTES:
            raise UserError(f"{path}: {path.stat().st_size} bytes, too large for a checkpoint")
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: unreadable ({exc.strerror})") from None
    try:
        with warnings.catch_warnings():  # torch warns on stderr about some refusals
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise UserError(f"{path}: refused, not a plain checkpoint ({first[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__})") from None


def identity_differences(found: dict, expected: dict) -> list[tuple[str, object, object]]:
    """(setting, found, expected) for each identity setting where two runs differ; the
    recipe compared field by field."""
    differences = []
    for key in IDENTITY:
        a, b = found.get(key), expected.get(key)
        if key == "recipe" and isinstance(a, dict) and isinstance(b, dict):
            differences += [(f"recipe.{k}", a.get(k), b.get(k))
                            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]  # fmt: skip
        elif a != b:
            differences.append((key, a, b))
    return differences


def _check_identity(path: Path, found: object, expected: dict) -> None:
    if not isinstance(found, dict):
        raise UserError(f"{path}: the checkpoint does not say which run it belongs to")
    differences = identity_differences(found, expected)
    if differences:
        what, ours, theirs = differences[0]
        raise UserError(
            f"{path} belongs to another run ({what} is {ours!r:.60} there, {theirs!r:.60} in "
            "config.json): resume the run it came from, or start this one with --overwrite"
        )
