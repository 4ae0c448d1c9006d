"""The seed recipe's test accuracy over many seeds, and its seconds per epoch, in one run.

One run of the course's recipe is one draw: the seed fixes the initial weights and the
order of the batches, and the final accuracy moves with it by a few tenths of a percent.
This trains seeds 0..N-1 of the `seed` recipe on each data set at each precision asked for
(`mnist_cnn.fit(model, ds, "seed", seed=s, out=None, precision=P)`), `--jobs` processes at
a time with `--threads` threads each, and prints a Markdown section for RESULTS.md: every
run's accuracy; their mean, standard deviation, minimum and maximum; the median seconds per
epoch; and where the course's own figure lies, in standard deviations from the mean.

`--loss flux` trains with the loss of the course's Flux 0.11 instead:
`crossentropy(softmax(z), y)` = `-log(softmax(z)[y] + eps(Float32))` (see `FluxLoss`).

    python benchmarks/seed_spread.py --seeds 10 --precision fp32 bf16 --jobs 2 --threads 1
    python benchmarks/seed_spread.py --datasets mnist --loss flux --seeds 10 --precision fp32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import multiprocessing
import shlex
import statistics
import sys

import torch
from harness import LoadMeter, machine_description
from measure import load_limited, seconds_per_epoch
from torch import nn

from mnist_cnn import build_model, fit
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


def train_one(dataset: str, seed: int, precision: str, loss: str, threads: int,
              epochs: float, train_limit: int | None) -> dict:  # fmt: skip
    """One run in a worker process: its final test accuracy and seconds of each epoch."""
    ds = load_limited(dataset, train_limit, None)
    torch.manual_seed(seed)
    model = build_model("seed", num_classes=ds.num_classes)
    if loss == "flux":
        model = FluxLoss(model)
    result = fit(
        model, ds, "seed", seed=seed, out=None, progress=False, log=None, threads=threads,
        precision=precision, epochs=epochs, eval_every=0,
    )  # fmt: skip
    return {
        "dataset": dataset,
        "seed": seed,
        "precision": precision,
        "loss": loss,
        "test_accuracy": result.test_accuracy,
        "epoch_seconds": seconds_per_epoch(result.history),
    }


def summarize(runs: list[dict]) -> dict:
    accuracies = [r["test_accuracy"] for r in sorted(runs, key=lambda r: r["seed"])]
    epochs = [s for r in runs for s in r["epoch_seconds"]]
    return {
        "accuracies": accuracies,
        "mean": statistics.fmean(accuracies),
        "sd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "min": min(accuracies),
        "max": max(accuracies),
        "epoch_seconds": statistics.median(epochs) if epochs else float("nan"),
    }


def section(groups: dict[tuple[str, str, str], dict], args: argparse.Namespace,
            other_load: float | None, minutes: float) -> str:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    seeds = f"seeds 0-{args.seeds - 1}" if args.seeds > 1 else "seed 0"
    lines = [
        f"## {now}: the seed recipe over {seeds} (benchmarks/seed_spread.py)",
        "",
        f"- Command: `python benchmarks/seed_spread.py {shlex.join(sys.argv[1:])}`",
        f"- Machine: {machine_description()}",
        f"- Run: {args.jobs} runs at a time, {args.threads} thread(s) each, "
        f"{args.epochs:g} epochs per run, {minutes:.0f} minutes in all",
        "- Other load while it ran: "
        + ("unknown" if other_load is None else f"{other_load:.0%} of all cores"),
        "",
        "| data set | precision | loss | runs | mean | sd | min | max | s/epoch (median) "
        "| course | course vs mean |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (dataset, precision, loss), s in groups.items():
        spec = spec_for(dataset)
        course = spec.course.accuracy if spec is not None and spec.course else None
        z = "" if course is None or s["sd"] == 0 else f"{(course - s['mean']) / s['sd']:+.1f} sd"
        lines.append(
            f"| {dataset} | {precision} | {loss} | {len(s['accuracies'])} | {s['mean']:.4f} "
            f"| {s['sd']:.4f} | {s['min']:.4f} | {s['max']:.4f} | {s['epoch_seconds']:.2f} "
            f"| {'' if course is None else f'{course:.4f}'} | {z} |"
        )
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
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--train-limit", type=int, help="train on the first N images only")
    args = parser.parse_args(argv)

    meter = LoadMeter()
    start = datetime.datetime.now()
    tasks = [
        (dataset, seed, precision, args.loss, args.threads, args.epochs, args.train_limit)
        for dataset in args.datasets
        for seed in range(args.seeds)
        for precision in args.precision  # side by side, so that both see the same load
    ]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = [pool.submit(train_one, *task) for task in tasks]
        runs = []
        for done in concurrent.futures.as_completed(futures):
            run = done.result()
            runs.append(run)
            print(f"{run['dataset']} {run['precision']} {run['loss']} seed {run['seed']}: "
                  f"{run['test_accuracy']:.4f}, "
                  f"{statistics.median(run['epoch_seconds']):.2f} s/epoch",
                  file=sys.stderr, flush=True)  # fmt: skip
    minutes = (datetime.datetime.now() - start).total_seconds() / 60
    groups = {}
    for dataset, _seed, precision, loss, *_ in tasks:
        key = (dataset, precision, loss)
        if key not in groups:
            groups[key] = summarize([r for r in runs if (r["dataset"], r["precision"],
                                                          r["loss"]) == key])  # fmt: skip
    print(section(groups, args, meter.other_share(), minutes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
