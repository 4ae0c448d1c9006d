"""The accelerator figures of RESULTS.md in one run, printed as a Markdown section.

On a machine with a GPU it measures, with `mnist_cnn.fit` on `--device cuda`:
the `fast` recipe's training seconds and test accuracy on MNIST and Fashion-MNIST for each
seed (the time to the notebook's accuracy, 0.9911 / 0.8984); the seed recipe's 10 epochs
on MNIST (seconds per epoch); and the seconds to evaluate the 10,000 test images.
A short untimed warm-up run comes first, so CUDA start-up and kernel selection are not
counted. Training seconds exclude evaluation, as everywhere in this project.

    python benchmarks/gpu.py                          # cuda, seeds 0 1 2
    python benchmarks/gpu.py --device cpu --seeds 0 --train-limit 512 --test-limit 200
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import shlex
import sys

import torch
from measure import load_limited, median_seconds, seconds_per_epoch

from mnist_cnn import UserError, build_model, evaluate, fit
from mnist_cnn.data.catalog import CATALOG
from mnist_cnn.device import select_device
from mnist_cnn.recipes import resolve_recipe

DATASETS = ("mnist", "fashion-mnist")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def train(ds, recipe: str, seed: int, device: str, **overrides):
    torch.manual_seed(seed)
    model = build_model(resolve_recipe(recipe, dataset=ds.name).model, ds.num_classes)
    return fit(model, ds, recipe, seed=seed, device=device, progress=False, log=None,
               eval_every=0, **overrides)  # fmt: skip


def eval_seconds(model: torch.nn.Module, ds, device: torch.device, repeats: int) -> float:
    def work():
        evaluate(model, ds.test)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return median_seconds(work, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seed-epochs", type=float, default=10, help="seed recipe epochs")
    parser.add_argument("--train-limit", type=int, metavar="N", help="first N training images")
    parser.add_argument("--test-limit", type=int, metavar="N", help="first N test images")
    parser.add_argument("--eval-repeats", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        device = select_device(args.device)
        data = {name: load_limited(name, args.train_limit, args.test_limit) for name in DATASETS}
    except UserError as exc:
        print(f"gpu.py: error: {exc}", file=sys.stderr)
        return 2

    train(data["mnist"], "fast", 0, args.device, epochs=0.05)  # warm-up, not reported

    given = sys.argv[1:] if argv is None else argv
    lines = [
        f"## {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: "
        f"{device_name(device)} (benchmarks/gpu.py)",
        "",
        f"- Command: `python benchmarks/gpu.py {shlex.join(given)}`",
        f"- torch {torch.__version__}, device {device}",
        "",
        "| recipe | data set | seed | test accuracy | notebook | training seconds |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, seed in itertools.product(DATASETS, args.seeds):
        run = train(data[name], "fast", seed, args.device)
        lines.append(
            f"| fast | {name} | {seed} | {run.test_accuracy:.4f} | "
            f"{CATALOG[name].course.accuracy:.4f} | {run.summary['train_seconds']:.2f} |"
        )
    run = train(data["mnist"], "seed", args.seeds[0], args.device, epochs=args.seed_epochs)
    lines.append(
        f"| seed | mnist | {args.seeds[0]} | {run.test_accuracy:.4f} | "
        f"{CATALOG['mnist'].course.accuracy:.4f} | {run.summary['train_seconds']:.2f} |"
    )
    per_epoch = seconds_per_epoch(run.history)
    seconds = eval_seconds(run.model, data["mnist"], device, args.eval_repeats)
    lines += [
        "",
        f"- Seed recipe, seconds of each epoch: {', '.join(f'{s:.2f}' for s in per_epoch)}",
        f"- Evaluating {len(data['mnist'].test):,} test images: {seconds:.4f} s "
        f"(median of {args.eval_repeats})",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
