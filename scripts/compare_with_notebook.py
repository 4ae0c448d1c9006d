"""Print each run's test accuracy beside the seed notebook's (used by `make run`)."""

import json
import sys
from pathlib import Path

from mnist_cnn.data.catalog import spec_for

for run_dir in map(Path, sys.argv[1:]):
    summary = json.loads((run_dir / "summary.json").read_text())
    course = spec_for(summary["dataset"]).course
    print(
        f"{summary['dataset']:<14} seed recipe: test accuracy {summary['test_accuracy']:.4f} "
        f"(notebook {course.accuracy:.4f}), {summary['train_seconds']:.0f} s of training "
        f"(notebook {course.train_seconds:.0f} s)  [{run_dir}]"
    )
