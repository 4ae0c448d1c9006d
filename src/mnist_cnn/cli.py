"""The `mnist-cnn` command line: parsing and printing only; each command calls the library.

Exit codes: 0 success, 1 unexpected failure, 2 bad input or usage (one line on stderr),
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnist_cnn.errors import UserError
from mnist_cnn.train import TrainingInterrupted

PROG = "mnist-cnn"


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


# --- data ---------------------------------------------------------------------------------


def cmd_data_list(args) -> int:
    from mnist_cnn.cache import cache_root
    from mnist_cnn.data import CATALOG
    from mnist_cnn.data.fetch import cache_status, configured_sources, recorded_source

    print(f"cache: {cache_root()}")
    print(f"{'name':<15}{'state':<12}{'source'}")
    for spec in CATALOG.values():
        states = set(cache_status(spec).values())
        if states == {"verified"}:
            state, where = "verified", recorded_source(spec) or "cache"
        else:
            state = "corrupt" if "corrupt" in states else "missing"
            options = [s.describe() for s in configured_sources(spec)]
            where = "will try: " + (", ".join(options) if options else "no source enabled")
        print(f"{spec.name:<15}{state:<12}{where}")
    return 0


def _dataset_names(names: list[str]) -> list[str]:
    from mnist_cnn.data import CATALOG

    for name in names:
        if name not in CATALOG:
            raise UserError(f"unknown data set '{name}': use one of {', '.join(CATALOG)}")
    return names or list(CATALOG)


def cmd_data_fetch(args) -> int:
    from mnist_cnn.data import CATALOG
    from mnist_cnn.data.fetch import provision, recorded_source

    for name in _dataset_names(args.names):
        spec = CATALOG[name]
        folder = provision(spec, log=None if args.quiet else lambda m: print(m, file=sys.stderr))
        if not args.quiet:
            print(f"{name}: verified in {folder} (from {recorded_source(spec) or 'cache'})")
    return 0


def cmd_data_verify(args) -> int:
    from mnist_cnn.data import CATALOG
    from mnist_cnn.data.fetch import cache_status, dataset_dir

    bad = []
    for name in _dataset_names(args.names):
        status = cache_status(CATALOG[name])
        problems = {f: s for f, s in status.items() if s != "verified"}
        if problems:
            detail = ", ".join(f"{f} {s}" for f, s in problems.items())
            print(f"{name}: FAILED ({detail})")
            bad.append(name)
        else:
            print(f"{name}: ok, 4 files match their md5 in {dataset_dir(CATALOG[name])}")
    if bad:
        raise UserError(
            f"{', '.join(bad)} failed verification: run `{PROG} data fetch {' '.join(bad)}`"
        )
    return 0


def cmd_data_show(args) -> int:
    from mnist_cnn.data import load_dataset
    from mnist_cnn.figures import sample_grid

    ds = load_dataset(args.name)
    split = ds.split(args.split)
    n = min(args.n, len(split))
    out = args.out or Path(f"{Path(ds.name).name}-{args.split}-samples.png")
    title = f"{ds.name}: first {n} {args.split} images and their labels"
    path = sample_grid(split.images[:n], split.labels[:n], ds.classes, title, out)
    print(f"wrote {path}")
    return 0


# --- train, evaluate, predict --------------------------------------------------------------


def _positive_float(text: str) -> float:
    value = _nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def cmd_train(args) -> int:
    import torch

    from mnist_cnn.data import load_dataset
    from mnist_cnn.distributed import current_world, destroy
    from mnist_cnn.figures import notebook_accuracy
    from mnist_cnn.models import build_model
    from mnist_cnn.recipes import resolve_recipe
    from mnist_cnn.rundir import default_run_dir
    from mnist_cnn.train import fit, resume_run

    main = current_world().is_main
    say = print if main else (lambda *a, **k: None)
    try:
        if args.resume:
            if args.out or args.overwrite:
                raise UserError("--resume continues RUN_DIR in place: drop --out/--overwrite")
            result = resume_run(args.resume, device=args.device, threads=args.threads)
            out = args.resume
        else:
            recipe = resolve_recipe(
                args.recipe, dataset=args.dataset, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
                precision=args.precision,
            )  # fmt: skip
            ds = load_dataset(args.dataset, log=lambda msg: say(msg, file=sys.stderr))
            out = args.out or default_run_dir(ds.name, recipe.name)
            torch.manual_seed(args.seed)
            model = build_model(recipe.model, num_classes=ds.num_classes)
            say(f"training '{recipe.model}' on {ds.name} with recipe '{recipe.name}' -> {out}")
            result = fit(
                model, ds, recipe, seed=args.seed, device=args.device, out=out,
                overwrite=args.overwrite, threads=args.threads, log=say,
            )  # fmt: skip
    finally:
        destroy()
    summary = result.summary
    if main:
        line = f"final test accuracy {summary['test_accuracy']:.4f}"
        reference = notebook_accuracy(summary["dataset"])
        if reference is not None:
            line += f" (notebook: {reference:.4f})"
        print(f"{line}, {summary['train_seconds']:.1f} s of training; run directory {out}")
    return 0


def cmd_evaluate(args) -> int:
    from mnist_cnn.reports import CONFUSION, MISTAKES, REPORT, evaluate_run

    report = evaluate_run(args.run_dir, args.split)
    print(f"{report['dataset']} {report['split']}: {report['images']} images")
    print(f"accuracy {report['accuracy']:.4f}  loss {report['loss']:.4f}  "
          f"mistakes {report['mistakes']}")  # fmt: skip
    width = max(8, *(len(r["class_name"]) for r in report["per_class"]))
    print(f"{'class':<{width}}  precision  recall      f1  support")
    for r in report["per_class"]:
        print(f"{r['class_name']:<{width}}  {r['precision']:9.4f}  {r['recall']:6.4f}  "
              f"{r['f1']:6.4f}  {r['support']:7d}")  # fmt: skip
    for name in (CONFUSION, MISTAKES, REPORT):
        print(f"wrote {Path(args.run_dir) / name}")
    return 0


def cmd_predict(args) -> int:
    import json

    import torch

    from mnist_cnn.data import load_dataset
    from mnist_cnn.images import load_image, style_for
    from mnist_cnn.predict import predict_records
    from mnist_cnn.rundir import CONFIG, load_model, read_json

    if bool(args.images) == (args.index is not None):
        raise UserError("give image files or --index N (one of the two)")
    model = load_model(args.run_dir)
    config = read_json(Path(args.run_dir) / CONFIG)
    classes = config["classes"]
    if args.index is not None:
        test = load_dataset(config["dataset"]).test
        if not 0 <= args.index < len(test):
            raise UserError(f"--index {args.index} is out of range: the test set has "
                            f"{len(test)} images (0..{len(test) - 1})")  # fmt: skip
        images = test.images[args.index : args.index + 1]
        names = [f"test[{args.index}]"]
    else:
        style = style_for(config["dataset"])
        images = torch.stack([load_image(path, style) for path in args.images])
        names = [str(p) for p in args.images]
    records = predict_records(model, images, names, classes, args.top_k)
    for record in records:
        if args.json:
            print(json.dumps(record))
        else:
            others = ", ".join(f"{t['class_name']} {t['probability']:.4f}" for t in record["top_k"])
            print(f"{record['input']}: {record['class_name']}  (top {len(record['top_k'])}: "
                  f"{others})")  # fmt: skip
    sys.stdout.flush()
    _write_prediction_figures(args, model, images, names, classes)
    return 0


def _numbered(path: Path, i: int, n: int) -> Path:
    """FILE.png for one input; FILE-1.png, FILE-2.png, ... for several."""
    return path if n == 1 else path.with_name(f"{path.stem}-{i + 1}{path.suffix}")


def _write_prediction_figures(args, model, images, names, classes) -> None:
    if not (args.plot or args.show_input):
        return
    import torch
    from PIL import Image

    from mnist_cnn.figures import prediction_plot
    from mnist_cnn.metrics import predict_logits

    probs = torch.softmax(predict_logits(model, images), dim=1)
    for i, name in enumerate(names):
        if args.plot:
            path = prediction_plot(images[i], probs[i], classes, name,
                                   _numbered(args.plot, i, len(names)))  # fmt: skip
            print(f"wrote {path}", file=sys.stderr)
        if args.show_input:
            path = _numbered(args.show_input, i, len(names))
            try:
                Image.fromarray(images[i].numpy()).save(path)
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot write {path} ({exc})") from None
            print(f"wrote {path}", file=sys.stderr)


def cmd_explain(args) -> int:
    from mnist_cnn.explain import explain_run

    for path in explain_run(args.run_dir, args.index, args.out):
        print(f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    from mnist_cnn.export import PARITY_TOLERANCE, export_onnx

    path, parity = export_onnx(args.run_dir, args.out)
    print(f"wrote {path}")
    print(f"parity with PyTorch on {parity.images} test images: {parity.classes_agree} classes "
          f"agree, max probability difference {parity.max_probability_difference:.1e} "
          f"(limit {PARITY_TOLERANCE:.0e})")  # fmt: skip
    return 0


def cmd_serve(args) -> int:
    web_stack = ("fastapi", "starlette", "uvicorn", "python_multipart")
    try:
        from mnist_cnn.serve import serve
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in web_stack:
            raise
        raise UserError(f"serve needs FastAPI and uvicorn ({exc.name} is not installed): "
                        "pip install 'mnist-cnn[serve]'") from None  # fmt: skip
    serve(args.run_dir, args.host, args.port)
    return 0


def cmd_bench(args) -> int:
    """Forward to benchmarks/harness.py: it lives in the source checkout, not in the package."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "harness.py"
    if not path.is_file():
        raise UserError(f"{path} not found: `{PROG} bench` needs a source checkout of mnist-cnn")
    spec = importlib.util.spec_from_file_location("mnist_cnn_bench_harness", path)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    return harness.main(args.harness_args, prog=f"{PROG} bench")


# --- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Train, evaluate and serve CNNs on MNIST-format data.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    data = commands.add_parser("data", help="provision, verify and look at the data sets")
    data_cmds = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    data_cmds.required = True
    p = data_cmds.add_parser("list", help="each data set: cached? verified? where from?")
    p.set_defaults(func=cmd_data_list)
    p = data_cmds.add_parser("fetch", help="provision into the cache and verify md5s")
    p.add_argument("names", nargs="*", metavar="NAME", help="mnist, fashion-mnist (default: all)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing unless it fails")
    p.set_defaults(func=cmd_data_fetch)
    p = data_cmds.add_parser("verify", help="re-hash what is cached")
    p.add_argument("names", nargs="*", metavar="NAME", help="mnist, fashion-mnist (default: all)")
    p.set_defaults(func=cmd_data_verify)
    p = data_cmds.add_parser("show", help="write a PNG grid of labelled samples")
    p.add_argument("name", metavar="NAME", help="mnist, fashion-mnist or an MNIST-format folder")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--n", type=_positive_int, default=64, help="how many images (default 64)")
    p.add_argument("--out", type=Path, help="PNG path (default NAME-SPLIT-samples.png)")
    p.set_defaults(func=cmd_data_show)

    p = commands.add_parser("train", help="train a model with a recipe; write a run directory")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder")
    p.add_argument(
        "--recipe", default="seed",
        help="seed (the notebook), fast (its accuracy in the least time), best (accuracy)",
    )  # fmt: skip
    p.add_argument("--epochs", type=_positive_float, help="passes over the data (may be 1.5)")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--threads", type=_positive_int,
        help="CPU threads (default: every core it may use; two runs at once: give each half)",
    )  # fmt: skip
    p.add_argument(
        "--eval-every", type=_nonnegative_float, metavar="SECONDS",
        help="evaluate every SECONDS of training and after each epoch (0: after epochs only)",
    )  # fmt: skip
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"],
        help="auto (the default): bf16 autocast where the hardware has it natively, else fp32",
    )  # fmt: skip
    p.add_argument("--out", type=Path, metavar="RUN_DIR", help="default runs/DATASET-RECIPE-TIME")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("evaluate", help="accuracy, per-class table, confusion + mistakes")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("predict", help="classify image files or a test image")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE")
    p.add_argument("--index", type=int, metavar="N", help="test image N of the run's data set")
    p.add_argument("--top-k", type=_positive_int, default=3)
    p.add_argument("--json", action="store_true", help="one JSON object per input, per line")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="the input as the model saw it beside its class probabilities")  # fmt: skip
    p.add_argument("--show-input", type=Path, metavar="FILE.png",
                   help="write the 28x28 image the model saw")  # fmt: skip
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("explain", help="filters.png and feature_maps.png for a test image")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--index", type=int, required=True, metavar="N", help="test image N")
    p.add_argument("--out", type=Path, metavar="DIR", help="folder for the PNGs (default RUN_DIR)")
    p.set_defaults(func=cmd_explain)

    p = commands.add_parser("export", help="ONNX model with its preprocessing contract")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", type=Path, metavar="FILE", help="default RUN_DIR/model.onnx")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("serve", help="web page and JSON API: draw a digit, see the answer")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port")
    p.set_defaults(func=cmd_serve)

    # prefix_chars="+": every argument after `bench`, options included, goes to the harness.
    p = commands.add_parser(
        "bench", help="benchmark training against plain PyTorch", add_help=False, prefix_chars="+"
    )
    p.add_argument("harness_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
