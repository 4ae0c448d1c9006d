"""The measurement protocol that `ours.py` and `reference.py` share.

Both scripts take the same flags and report the same JSON keys, computed by the same
functions here, so a difference between them is a difference in training code and not in
how it was timed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the data sets load on use: keras_reference.py runs without torch
    from mnist_cnn import Dataset

RESULT_KEYS = (
    "epoch_seconds",
    "eval_seconds",
    "test_accuracy",
    "peak_rss_mb",
    "time_to_target",
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def common_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder")
    parser.add_argument("--epochs", type=_positive_int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--target",
        type=float,
        help="report the training seconds until the test accuracy first reaches this",
    )
    parser.add_argument(
        "--train-limit", type=_positive_int, metavar="N", help="train on the first N images only"
    )
    parser.add_argument(
        "--test-limit", type=_positive_int, metavar="N", help="test on the first N images only"
    )
    parser.add_argument(
        "--eval-repeats",
        type=_positive_int,
        default=3,
        metavar="N",
        help="timed evaluations after training (after one untimed warm-up); the median counts",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON line on stdout (the rest on stderr)"
    )
    return parser


def load_limited(name: str, train_limit: int | None, test_limit: int | None) -> Dataset:
    """The data set, cut to its first images so that tests can run a tiny budget."""
    from mnist_cnn import Dataset, Split, load_dataset

    ds = load_dataset(name)
    train, test = ds.train, ds.test
    return Dataset(
        name=ds.name,
        train=Split(train.images[:train_limit], train.labels[:train_limit]),
        test=Split(test.images[:test_limit], test.labels[:test_limit]),
        classes=ds.classes,
    )


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    """Median wall time of `work` after one untimed call.

    The first call pays one-time costs (allocator growth, kernel selection) that a user
    evaluating repeatedly pays once; the median shrugs off one interrupted call.
    """
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seconds_per_epoch(history: Sequence[dict]) -> list[float]:
    """Training seconds per epoch over each stretch of `fit`'s history run with
    `eval_every=0`: the rows after the untrained one are the epoch ends (the last may end a
    part of an epoch, as in `fast`'s 1.6), with cumulative training seconds and epochs."""
    rows = [(0.0, 0.0)] + [(row["epoch"], row["seconds"]) for row in history if row["step"] > 0]
    return [(s1 - s0) / (e1 - e0) for (e0, s0), (e1, s1) in itertools.pairwise(rows)]


def time_to_target(
    accuracies: Sequence[float], cumulative_seconds: Sequence[float], target: float | None
) -> float | None:
    """Training seconds at the first evaluation whose accuracy reaches `target`, else None."""
    if target is None:
        return None
    for accuracy, seconds in zip(accuracies, cumulative_seconds, strict=True):
        if accuracy >= target:
            return seconds
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory; Linux reports ru_maxrss in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result_record(
    epoch_seconds: Sequence[float],
    epoch_accuracies: Sequence[float],
    eval_seconds: float,
    test_accuracy: float,
    test_images: int,
    target: float | None,
    **settings,
) -> dict:
    """The JSON object every side prints; `settings` (threads, precision) ride along."""
    if "threads" not in settings:
        import torch

        settings["threads"] = torch.get_num_threads()
    cumulative, total = [], 0.0
    for seconds in epoch_seconds:
        total += seconds
        cumulative.append(total)
    return {
        "epoch_seconds": [round(s, 4) for s in epoch_seconds],
        "eval_seconds": round(eval_seconds, 4),
        "test_accuracy": test_accuracy,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "time_to_target": time_to_target(epoch_accuracies, cumulative, target),
        "epoch_accuracies": list(epoch_accuracies),
        "test_images": test_images,
        **settings,
    }


def report(record: dict, as_json: bool) -> None:
    """Human lines (on stderr when `as_json`, so stdout carries only the JSON line)."""
    out = sys.stderr if as_json else sys.stdout
    epochs = zip(record["epoch_seconds"], record["epoch_accuracies"], strict=True)
    for i, (seconds, accuracy) in enumerate(epochs, start=1):
        print(f"epoch {i}: {seconds:.2f} s of training, test accuracy {accuracy:.4f}", file=out)
    print(f"evaluation of {record['test_images']} test images: {record['eval_seconds']:.3f} s",
          file=out)  # fmt: skip
    print(f"final test accuracy {record['test_accuracy']:.4f}", file=out)
    reached = record["time_to_target"]
    if reached is not None:
        print(f"target reached after {reached:.2f} s of training", file=out)
    print(f"peak RSS {record['peak_rss_mb']:.0f} MB", file=out)
    if as_json:
        print(json.dumps(record), flush=True)
