"""Seconds per epoch of one recipe in two versions of this project, measured in one run.

    python benchmarks/versions.py --before REV [--recipe seed] [--precision bf16] [--reps 5]

Checks REV out into a temporary git worktree and trains the recipe with `fit` from each
version in turn, each in a fresh process (before, after, before, after, ...), so that both
see the same drifts of a shared machine. A refactoring that claims to cost nothing is
checked here. Prints a Markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside each version: the public API both versions share.
TRAIN = """
import json, sys, torch
from mnist_cnn import build_model, fit, load_dataset
recipe, precision, epochs = sys.argv[1], sys.argv[2], float(sys.argv[3])
torch.manual_seed(0)
ds = load_dataset("mnist")
run = fit(build_model(recipe), ds, recipe, epochs=epochs, eval_every=0, precision=precision,
          progress=False, log=None)
ends = [r["seconds"] for r in run.history if r["step"] > 0]
print(json.dumps([b - a for a, b in zip([0.0] + ends, ends)]))
"""


def epoch_seconds(src: Path, recipe: str, precision: str, epochs: float) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", TRAIN, recipe, precision, str(epochs)],
                          env=env, capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the git revision to compare with")
    parser.add_argument("--recipe", default="seed")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree),
                        args.before], check=True, capture_output=True)  # fmt: skip
        try:
            before, after = [], []
            for _ in range(args.reps):
                before += epoch_seconds(worktree / "src", args.recipe, args.precision, args.epochs)
                after += epoch_seconds(ROOT / "src", args.recipe, args.precision, args.epochs)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(worktree)], check=False, capture_output=True)  # fmt: skip
    b, a = statistics.median(before), statistics.median(after)
    print(f"## Seconds per epoch, {args.before[:10]} against now, {time.strftime('%Y-%m-%d')} "
          "(benchmarks/versions.py)\n")  # fmt: skip
    print(f"- Command: `python benchmarks/versions.py --before {args.before} --recipe "
          f"{args.recipe} --precision {args.precision} --reps {args.reps}`\n")  # fmt: skip
    print("| version | median s/epoch | all epochs |")
    print("|---|---|---|")
    print(f"| {args.before[:10]} | {b:.2f} | {', '.join(f'{x:.2f}' for x in before)} |")
    print(f"| now | {a:.2f} | {', '.join(f'{x:.2f}' for x in after)} |")
    print(f"\nNow / before: **{a / b:.3f}**.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
