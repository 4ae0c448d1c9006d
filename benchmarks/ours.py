"""Our side of the benchmark: a recipe trained with `mnist_cnn.fit`, measured as reference.py is.

Evaluation happens only at epoch ends (`eval_every=0`), so the history rows after the
untrained one are the epoch ends, and their cumulative training `seconds` (evaluation
excluded by fit itself) give the seconds of each epoch. The evaluation seconds are those
of `evaluate(load_model(run_dir), ds.test)`: the public API on the written run.

    python benchmarks/ours.py --dataset mnist --epochs 2 --seed 0 [--target 0.98] [--json]
"""

from __future__ import annotations

import sys
import tempfile

import torch
from measure import (
    common_parser,
    load_limited,
    median_seconds,
    report,
    result_record,
    seconds_per_epoch,
)

from mnist_cnn import UserError, build_model, evaluate, fit, load_model, resolve_recipe
from mnist_cnn.device import resolve_precision, select_device


def main(argv: list[str] | None = None) -> int:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="seed", help="the recipe to train (default seed)")
    args = parser.parse_args(argv)
    try:
        ds = load_limited(args.dataset, args.train_limit, args.test_limit)
        recipe = resolve_recipe(args.recipe)
    except UserError as exc:
        print(f"ours.py: error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = build_model(recipe.model, num_classes=ds.num_classes)
    with tempfile.TemporaryDirectory() as folder:
        result = fit(
            model, ds, recipe, epochs=args.epochs, eval_every=0, seed=args.seed, out=folder,
            progress=False, log=None,
        )  # fmt: skip
        # Evaluation as a user of the API runs it: the trained run loaded from its folder.
        trained = load_model(folder)
    epoch_accuracies = [row["test_accuracy"] for row in result.history if row["step"] > 0]

    eval_seconds = median_seconds(lambda: evaluate(trained, ds.test), args.eval_repeats)
    record = result_record(
        seconds_per_epoch(result.history),
        epoch_accuracies,
        eval_seconds,
        test_accuracy=evaluate(trained, ds.test).accuracy,
        test_images=len(ds.test),
        target=args.target,
        side="ours",
        recipe=recipe.name,
        precision=resolve_precision(result.recipe.precision, select_device("auto")),
    )
    report(record, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
