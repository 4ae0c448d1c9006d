"""A recipe's test accuracy over many seeds, and its training time, in one run.

One run of a recipe is one draw: the seed fixes the initial weights and the order of the
batches, and the final accuracy moves with it by a few tenths of a percent. This trains
seeds 0..N-1 of a recipe (`--recipe`, default `seed`) on each data set at each precision
asked for (`mnist_cnn.fit(model, ds, RECIPE, seed=s, out=None, precision=P)`), `--jobs`
processes at a time with `--threads` threads each, and prints a Markdown section for
RESULTS.md: every run's accuracy; their mean, standard deviation, minimum and maximum; how
many runs reach the course's figure; the median seconds per epoch and per whole run; and
where the course's own figure lies, in standard deviations from the mean.

`--reference-epochs N` also times N single epochs of the plain-PyTorch reference
(`reference.py --epochs 1`, fresh processes spread among the runs), so that a run's training
time can be quoted as a ratio to one reference epoch measured in the same run (use it with
`--jobs 1`, so that the two sides never share the cores).

`--loss flux` trains with the loss of the course's Flux 0.11 instead:
`crossentropy(softmax(z), y)` = `-log(softmax(z)[y] + eps(Float32))` (see `FluxLoss`).

    python benchmarks/seed_spread.py --seeds 10 --precision fp32 bf16 --jobs 2 --threads 1
    python benchmarks/seed_spread.py --datasets mnist --loss flux --seeds 10 --precision fp32
    python benchmarks/seed_spread.py --recipe fast --precision bf16 fp32 --jobs 1 --threads 2 \
        --reference-epochs 6
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from harness import LoadMeter, machine_description
from measure import load_limited, seconds_per_epoch
from torch import nn

from mnist_cnn import build_model, fit, resolve_recipe
from mnist_cnn.data.catalog import spec_for

DATASETS = ("mnist", "fashion-mnist")


class FluxLoss(nn.Module):
    """Wraps a logits model so that cross-entropy on its output is Flux 0.11's loss.

    Flux 0.11's `crossentropy(ŷ, y)` is `-sum(y .* log.(ŷ .+ ϵ))` with ϵ = eps(Float32)
    (1.19e-7), taken on `ŷ = softmax(z)`. Feeding u = log(softmax(z) + ϵ) to PyTorch's
    cross-entropy gives -log(p_y + ϵ) + log(1 + Kϵ): the same loss plus a constant (the
    p_j sum to 1), so the same gradient. The argmax, hence the accuracy, is unchanged.
    What differs from the exact loss: an image whose true class gets a probability far
    below ϵ stops pulling on the weights, and no image's loss exceeds -log(ϵ) = 15.9.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.model(x).float(), dim=1)
        return torch.log(p + torch.finfo(torch.float32).eps)


def train_one(recipe: str, dataset: str, seed: int, precision: str, loss: str, threads: int,
              epochs: float | None, train_limit: int | None) -> dict:  # fmt: skip
    """One run in a worker process: its final test accuracy and training seconds."""
    ds = load_limited(dataset, train_limit, None)
    torch.manual_seed(seed)
    model = build_model(resolve_recipe(recipe, dataset).model, num_classes=ds.num_classes)
    if loss == "flux":
        model = FluxLoss(model)
    result = fit(
        model, ds, recipe, seed=seed, out=None, progress=False, log=None, threads=threads,
        precision=precision, epochs=epochs, eval_every=0,
    )  # fmt: skip
    return {
        "dataset": dataset,
        "seed": seed,
        "precision": precision,
        "loss": loss,
        "test_accuracy": result.test_accuracy,
        "epoch_seconds": seconds_per_epoch(result.history),
        "train_seconds": result.summary["train_seconds"],
    }


def reference_epoch(dataset: str) -> float:
    """Seconds of one epoch of the plain-PyTorch reference, in a fresh process."""
    script = Path(__file__).with_name("reference.py")
    done = subprocess.run(
        [sys.executable, str(script), "--json", "--dataset", dataset, "--epochs", "1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    record = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return record["epoch_seconds"][0]


def summarize(runs: list[dict], course: float | None = None) -> dict:
    accuracies = [r["test_accuracy"] for r in sorted(runs, key=lambda r: r["seed"])]
    epochs = [s for r in runs for s in r["epoch_seconds"]]
    return {
        "reached": None if course is None else sum(a >= course for a in accuracies),
        "train_seconds": statistics.median(r["train_seconds"] for r in runs),
        "accuracies": accuracies,
        "mean": statistics.fmean(accuracies),
        "sd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "min": min(accuracies),
        "max": max(accuracies),
        "epoch_seconds": statistics.median(epochs) if epochs else float("nan"),
    }


def course_accuracy(dataset: str) -> float | None:
    spec = spec_for(dataset)
    return spec.course.accuracy if spec is not None and spec.course else None


def section(groups: dict[tuple[str, str, str], dict], args: argparse.Namespace,
            other_load: float | None, minutes: float,
            reference: dict[str, list[float]]) -> str:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    seeds = f"seeds 0-{args.seeds - 1}" if args.seeds > 1 else "seed 0"
    epochs = "the recipe's" if args.epochs is None else f"{args.epochs:g}"
    lines = [
        f"## {now}: the {args.recipe} recipe over {seeds} (benchmarks/seed_spread.py)",
        "",
        f"- Command: `python benchmarks/seed_spread.py {shlex.join(sys.argv[1:])}`",
        f"- Machine: {machine_description()}",
        f"- Run: {args.jobs} runs at a time, {args.threads} thread(s) each, "
        f"{epochs} epochs per run, {minutes:.0f} minutes in all",
        "- Other load while it ran: "
        + ("unknown" if other_load is None else f"{other_load:.0%} of all cores"),
        "",
        "| data set | precision | loss | runs | mean | sd | min | max | reach the course "
        "| s/epoch (median) | s/run (median) | s/run / reference epoch | course "
        "| course vs mean |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (dataset, precision, loss), s in groups.items():
        course = course_accuracy(dataset)
        z = "" if course is None or s["sd"] == 0 else f"{(course - s['mean']) / s['sd']:+.1f} sd"
        ref = reference.get(dataset)
        ratio = f"{s['train_seconds'] / statistics.median(ref):.2f}" if ref else ""
        reached = "" if s["reached"] is None else f"{s['reached']} of {len(s['accuracies'])}"
        lines.append(
            f"| {dataset} | {precision} | {loss} | {len(s['accuracies'])} | {s['mean']:.4f} "
            f"| {s['sd']:.4f} | {s['min']:.4f} | {s['max']:.4f} | {reached} "
            f"| {s['epoch_seconds']:.2f} | {s['train_seconds']:.2f} | {ratio} "
            f"| {'' if course is None else f'{course:.4f}'} | {z} |"
        )
    for dataset, seconds in reference.items():
        lines.append(f"\nReference, seconds of one epoch on {dataset} (`reference.py --epochs 1`,"
                     f" {len(seconds)} fresh processes): median {statistics.median(seconds):.2f}"
                     f" ({', '.join(f'{x:.2f}' for x in seconds)})")  # fmt: skip
    lines += ["", "Test accuracy of each run, seed 0 first:", ""]
    for (dataset, precision, loss), s in groups.items():
        runs = " ".join(f"{a:.4f}" for a in s["accuracies"])
        lines.append(f"- {dataset}, {precision}, {loss} loss: {runs}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--seeds", type=int, default=10, help="train seeds 0..N-1")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--loss", default="torch", choices=["torch", "flux"],
                        help="torch: cross-entropy on logits; flux: Flux 0.11's")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="threads of each run")
    parser.add_argument("--recipe", default="seed", help="the recipe to train (default seed)")
    parser.add_argument("--epochs", type=float, help="default: the recipe's")
    parser.add_argument("--reference-epochs", type=int, default=0, metavar="N",
                        help="time N single epochs of reference.py per data set too")  # fmt: skip
    parser.add_argument("--train-limit", type=int, help="train on the first N images only")
    args = parser.parse_args(argv)

    meter = LoadMeter()
    start = datetime.datetime.now()
    tasks = [
        (args.recipe, dataset, seed, precision, args.loss, args.threads, args.epochs,
         args.train_limit)
        for dataset in args.datasets
        for seed in range(args.seeds)
        for precision in args.precision  # side by side, so that both see the same load
    ]  # fmt: skip
    # Reference epochs spread evenly among the runs of their data set (before the first).
    per_dataset = len(tasks) // len(args.datasets)
    every = max(1, per_dataset // max(1, args.reference_epochs))
    reference: dict[str, list[float]] = {}
    context = multiprocessing.get_context("spawn")
    runs = []
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = []
        for index, task in enumerate(tasks):
            dataset = task[1]
            timed = reference.setdefault(dataset, []) if args.reference_epochs else []
            if (
                args.reference_epochs
                and index % per_dataset % every == 0
                and (len(timed) < args.reference_epochs)
            ):
                concurrent.futures.wait(futures)  # alone on the machine
                timed.append(reference_epoch(dataset))
                print(f"reference {dataset}: {timed[-1]:.2f} s/epoch", file=sys.stderr)
            futures.append(pool.submit(train_one, *task))
            if args.jobs == 1:
                futures[-1].result()
        for done in concurrent.futures.as_completed(futures):
            run = done.result()
            runs.append(run)
            print(f"{run['dataset']} {run['precision']} {run['loss']} seed {run['seed']}: "
                  f"{run['test_accuracy']:.4f}, {run['train_seconds']:.2f} s of training",
                  file=sys.stderr, flush=True)  # fmt: skip
    minutes = (datetime.datetime.now() - start).total_seconds() / 60
    groups = {}
    for _recipe, dataset, _seed, precision, loss, *_ in tasks:
        key = (dataset, precision, loss)
        if key not in groups:
            groups[key] = summarize([r for r in runs if (r["dataset"], r["precision"],
                                                          r["loss"]) == key],
                                    course_accuracy(dataset))  # fmt: skip
    print(section(groups, args, meter.other_share(), minutes, reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
