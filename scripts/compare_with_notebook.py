"""Print each run's test accuracy beside the course notebook's, and say whether it lies
inside the seed recipe's measured seed-to-seed spread (used by `make run`).

One run is one draw: the seed alone moves the final accuracy by a few tenths of a percent.
The spread (mean, sd and range over 10 seeds, float32) is on the catalogue entry of each
data set (`spec_for(name).seed_spread`, measured with benchmarks/seed_spread.py); a result
within 2.5 standard deviations of the mean is a plausible draw of the recipe.
"""

import json
import sys
from pathlib import Path

from mnist_cnn.data.catalog import spec_for

PLAUSIBLE_SDS = 2.5


def where(accuracy: float, spread) -> str:
    """Where `accuracy` lies in the spread, in words."""
    sds = spread.sds_from_mean(accuracy)
    if spread.low <= accuracy <= spread.high:
        verdict = "within the 10-seed range: inside the seed spread"
    elif abs(sds) <= PLAUSIBLE_SDS:
        verdict = f"outside the 10-seed range but within {PLAUSIBLE_SDS} sd: inside the seed spread"
    else:
        verdict = f"more than {PLAUSIBLE_SDS} sd from the mean: outside the seed spread"
    return f"{sds:+.1f} sd from the mean, {verdict}"


def report(run_dir: Path) -> list[str]:
    summary = json.loads((run_dir / "summary.json").read_text())
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    accuracy = summary["test_accuracy"]
    lines = [
        f"{summary['dataset']}, {summary['recipe']} recipe [{run_dir}]: test accuracy "
        f"{accuracy:.4f} after {summary['train_seconds']:.0f} s of training"
    ]
    spec = spec_for(summary["dataset"])
    if spec is None or spec.course is None:
        return lines
    course = spec.course
    lines.append(
        f"  course notebook: {course.accuracy:.4f} after {course.train_seconds:.0f} s of training "
        f"({course.first_epoch_seconds} s for the first epoch + {course.other_epochs_seconds} s "
        "for nine more, Flux on the course's CPU)"
    )
    spread = spec.seed_spread
    if spread is None or summary["recipe"] != "seed" or summary.get("epochs") != 10:
        return lines
    lines.append(
        f"  seed recipe over {spread.runs} seeds (float32): mean {spread.mean:.4f}, "
        f"sd {spread.sd:.4f}, range {spread.low:.4f}-{spread.high:.4f}"
    )
    precision = config.get("precision")
    note = f" (this run in {precision})" if precision not in (None, "fp32") else ""
    lines.append(f"  this run{note}: {where(accuracy, spread)}")
    lines.append(f"  the course: {where(course.accuracy, spread)}")
    return lines


if __name__ == "__main__":
    for run_dir in map(Path, sys.argv[1:]):
        print("\n".join(report(run_dir)))
