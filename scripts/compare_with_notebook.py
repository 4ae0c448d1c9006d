"""Print each run's test accuracy beside the seed notebook's (used by `make run`)."""

import json
import sys
from pathlib import Path

from mnist_cnn.data.catalog import NOTEBOOK_ACCURACY

for run_dir in map(Path, sys.argv[1:]):
    summary = json.loads((run_dir / "summary.json").read_text())
    reference = NOTEBOOK_ACCURACY.get(summary["dataset"])
    print(
        f"{summary['dataset']:<14} seed recipe: test accuracy {summary['test_accuracy']:.4f} "
        f"(notebook {reference:.4f}), {summary['train_seconds']:.0f} s of training "
        f"(notebook about 442 s)  [{run_dir}]"
    )
