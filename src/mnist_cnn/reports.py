"""`evaluate` on a run directory: scores, per-class table, figures and report.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mnist_cnn.figures import confusion_matrix, mistakes_grid
from mnist_cnn.io import write_atomic
from mnist_cnn.metrics import evaluate
from mnist_cnn.predict import NonFiniteOutput, check_finite
from mnist_cnn.run import CONFUSION, MISTAKES, REPORT, WEIGHTS, Run

MISTAKES_SHOWN = 32


def evaluate_run(run_dir: str | Path, split: str = "test") -> dict:
    """Evaluate a trained run on one split of its data set; write figures and report.json."""
    run = Run(run_dir)
    model = run.load_model()
    data = run.dataset.split(split)
    classes = run.classes
    result = evaluate(model, data)
    check_finite(result.probabilities, run.path / WEIGHTS)  # JSON has no NaN
    if not math.isfinite(result.loss):
        raise NonFiniteOutput(run.path / WEIGHTS)
    per_class = [{"class_name": classes[row["class_index"]], **row} for row in result.per_class()]
    name = Path(run.dataset_name).name
    confusion = result.confusion()
    confusion_matrix(
        confusion, classes,
        f"{name} {split}: confusion matrix (accuracy {result.accuracy:.4f})",
        run.output(CONFUSION),
    )  # fmt: skip

    wrong = torch.nonzero(result.predictions != result.labels).flatten()
    confidence = result.probabilities.max(1).values
    worst = wrong[confidence[wrong].argsort(descending=True)][:MISTAKES_SHOWN]
    mistakes_grid(
        data.images[worst], result.labels[worst], result.predictions[worst], confidence[worst],
        classes,
        f"{name} {split}: the {len(worst)} most confident of {len(wrong)} mistakes",
        run.output(MISTAKES),
    )  # fmt: skip
    report = {
        "dataset": run.dataset_name,
        "split": split,
        "images": len(data),
        "accuracy": result.accuracy,
        "loss": result.loss,
        "mistakes": len(wrong),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    write_atomic(run.output(REPORT), text.encode())
    return report
