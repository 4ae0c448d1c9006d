"""Whole-process start-up of the command line, against `import torch` alone, in one run.

    python benchmarks/startup.py [--reps 10]

Trains a tiny run first (for `predict`), then times each command as a user runs it
(a fresh process, wall clock), alternating commands so that drifts hit all alike, and
prints a Markdown section for benchmarks/RESULTS.md with the medians.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mnist_cnn.device import available_cores

PYTHON = sys.executable
CLI = [PYTHON, "-m", "mnist_cnn"]


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run([*CLI, "train", "--epochs", "0.05", "--eval-every", "0", "--out", str(run)],
                       check=True, capture_output=True)  # fmt: skip
        digit = Path(tmp) / "digit.png"
        canvas = np.full((200, 160), 255, np.uint8)
        canvas[40:160, 70:90] = 0  # a dark stroke on white paper: a 1
        Image.fromarray(canvas).save(digit)
        commands = {
            "`python -c 'import torch'`": [PYTHON, "-c", "import torch"],
            "`mnist-cnn --help`": [*CLI, "--help"],
            "`mnist-cnn train --epochs inf` (an argument error)": [
                *CLI,
                "train",
                "--epochs",
                "inf",
            ],
            "`mnist-cnn data list`": [*CLI, "data", "list"],
            "`mnist-cnn predict RUN --index 0`": [*CLI, "predict", str(run), "--index", "0"],
            "`mnist-cnn predict RUN digit.png`": [*CLI, "predict", str(run), str(digit)],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.reps):
            for name, command in commands.items():
                times[name].append(seconds(command))
    torch_alone = statistics.median(next(iter(times.values())))
    print(f"## CLI start-up, {time.strftime('%Y-%m-%d')} (benchmarks/startup.py)\n")
    print(f"- Command: `python benchmarks/startup.py --reps {args.reps}`")
    print(f"- Machine: {platform.machine()}, {available_cores()} cores; whole-process wall "
          f"clock, medians of {args.reps}\n")  # fmt: skip
    print("| command | seconds | minus `import torch` |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median - torch_alone:+.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
