"""`evaluate` on a run directory: scores, per-class table, figures and report.json."""

from __future__ import annotations

from pathlib import Path

import torch

from mnist_cnn import rundir
from mnist_cnn.data import load_dataset
from mnist_cnn.figures import confusion_matrix, mistakes_grid
from mnist_cnn.metrics import evaluate

REPORT = "report.json"
CONFUSION = "confusion.png"
MISTAKES = "mistakes.png"
MISTAKES_SHOWN = 32


def evaluate_run(run_dir: str | Path, split: str = "test") -> dict:
    """Evaluate a trained run on one split of its data set; write figures and report.json."""
    run_dir = Path(run_dir)
    model = rundir.load_model(run_dir)
    config = rundir.read_json(run_dir / rundir.CONFIG)
    ds = load_dataset(config["dataset"])
    classes = tuple(config["classes"])
    data = ds.split(split)
    result = evaluate(model, data)
    per_class = [{"class_name": classes[row["class_index"]], **row} for row in result.per_class()]
    name = Path(ds.name).name
    confusion = result.confusion()
    confusion_matrix(
        confusion, classes,
        f"{name} {split}: confusion matrix (accuracy {result.accuracy:.4f})",
        run_dir / CONFUSION,
    )  # fmt: skip

    wrong = torch.nonzero(result.predictions != result.labels).flatten()
    confidence = result.probabilities.max(1).values
    worst = wrong[confidence[wrong].argsort(descending=True)][:MISTAKES_SHOWN]
    mistakes_grid(
        data.images[worst], result.labels[worst], result.predictions[worst], confidence[worst],
        classes,
        f"{name} {split}: the {len(worst)} most confident of {len(wrong)} mistakes",
        run_dir / MISTAKES,
    )  # fmt: skip
    report = {
        "dataset": ds.name,
        "split": split,
        "images": len(data),
        "accuracy": result.accuracy,
        "loss": result.loss,
        "mistakes": len(wrong),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }
    rundir.write_json(run_dir / REPORT, report)
    return report
