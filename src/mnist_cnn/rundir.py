"""The run directory: config, metrics, summary, weights. Every file is written atomically."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mnist_cnn.data.idx import write_atomic
from mnist_cnn.errors import UserError
from mnist_cnn.models import build_model

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
WEIGHTS = "model.safetensors"
CURVES = "curves.png"
# Everything a run writes (train, then evaluate): what --overwrite clears.
RUN_FILES = (CONFIG, METRICS, SUMMARY, WEIGHTS, CURVES, "checkpoint.pt", "report.json",
             "confusion.png", "mistakes.png")  # fmt: skip


def default_run_dir(dataset: str, recipe: str, root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{Path(dataset).name}-{recipe}-{stamp}"


def prepare_run_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create the run directory; refuse to reuse a non-empty one unless `overwrite`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a folder: choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(
            f"{path} already holds a run: pass --overwrite to replace it, "
            "--resume to continue it, or choose another --out"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                (path / name).unlink(missing_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to run directory {path} ({exc.strerror})") from None
    return path


def write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def append_jsonl(path: Path, obj) -> None:
    """Append one line; a torn last line (crash mid-write) is skipped by `read_metrics`."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: is {Path(path).parent} a run directory?") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc})") from None


def read_metrics(path: Path) -> list[dict]:
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def save_weights(model: nn.Module, path: Path) -> None:
    """Weights as safetensors (never pickle), contiguous, through temp file + rename."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained network of a run directory, in eval mode, from config.json + weights."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder: pass a run directory made by `train`")
    config = read_json(run_dir / CONFIG)
    try:
        model_name = config["recipe"]["model"]
        num_classes = len(config["classes"])
    except (KeyError, TypeError):
        raise UserError(f"{run_dir / CONFIG}: lacks recipe.model or classes") from None
    model = build_model(model_name, num_classes=num_classes)
    weights = run_dir / WEIGHTS
    if not weights.exists():
        raise UserError(f"{weights} not found: the run has not finished an epoch yet")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{weights}: unreadable weights ({exc})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise UserError(
            f"{weights} does not fit model '{model_name}' with {num_classes} classes ({first})"
        ) from None
    return model.to(device).eval()
