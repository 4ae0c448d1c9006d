"""The `mnist-cnn` command line: parsing and printing only; each command calls the library.

Exit codes: 0 success, 1 unexpected failure, 2 bad input or usage (one line on stderr),
130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

from mnist_cnn.errors import TrainingInterrupted, UserError
from mnist_cnn.paths import check_output

PROG = "mnist-cnn"


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _int_in(low: int, high: int):
    """An argparse type: an integer in low..high."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} must lie in {low}..{high}")
        return value

    return parse


def _float_in(low: float, high: float, low_open: bool = False):
    """An argparse type: a finite number in low..high (above low if `low_open`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not (math.isfinite(value) and (value > low if low_open else value >= low)
                and value <= high):  # fmt: skip
            side = "more than" if low_open else "at least"
            raise argparse.ArgumentTypeError(f"{text} must be {side} {low:g} and at most {high:g}")
        return value

    return parse


_positive_int = _int_in(1, 1_000_000_000)


def _check_cache_setting() -> None:
    """A cache set (MNIST_CNN_CACHE, XDG_CACHE_HOME) where no folder can be is the user's
    setting to fix: said before any work, in one line."""
    var = next((v for v in ("MNIST_CNN_CACHE", "XDG_CACHE_HOME") if os.environ.get(v)), None)
    if var is None:
        return
    from mnist_cnn.cache import cache_root

    root = cache_root()
    blocker = next((p for p in (root, *root.parents) if p.exists()), None)
    if blocker is None or blocker.is_dir():
        return
    where = "is a file" if blocker == root else f"cannot be made a folder ({blocker} is a file)"
    raise UserError(f"{var}={os.environ[var]} {where}: point {var} at a folder (it is made "
                    "if missing), or unset it")  # fmt: skip


# --- data ---------------------------------------------------------------------------------


def cmd_data_list(args) -> int:
    from mnist_cnn.cache import cache_root
    from mnist_cnn.data.catalog import CATALOG
    from mnist_cnn.data.fetch import cache_status, configured_sources, recorded_source

    print(f"cache: {cache_root()}")
    print(f"{'name':<15}{'state':<12}{'source'}")
    for spec in CATALOG.values():
        states = set(cache_status(spec, quick=True).values())
        if states == {"verified"}:
            state, where = "verified", recorded_source(spec) or "cache"
        else:
            state = "corrupt" if "corrupt" in states else "missing"
            options = [s.describe() for s in configured_sources(spec)]
            where = "will try: " + (", ".join(options) if options else "no source enabled")
        print(f"{spec.name:<15}{state:<12}{where}")
    return 0


def _dataset_names(names: list[str]) -> list[str]:
    from mnist_cnn.data.catalog import CATALOG

    for name in names:
        if name not in CATALOG:
            raise UserError(f"unknown data set '{name}': use one of {', '.join(CATALOG)}")
    return names or list(CATALOG)


def cmd_data_fetch(args) -> int:
    from mnist_cnn.data.catalog import CATALOG
    from mnist_cnn.data.fetch import provision, recorded_source

    for name in _dataset_names(args.names):
        spec = CATALOG[name]
        folder = provision(spec, log=None if args.quiet else lambda m: print(m, file=sys.stderr))
        if not args.quiet:
            print(f"{name}: verified in {folder} (from {recorded_source(spec) or 'cache'})")
    return 0


def cmd_data_verify(args) -> int:
    from mnist_cnn.data.catalog import CATALOG
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
    check_output(args.out, "choose another --out")
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


def cmd_train(args) -> int:
    check_output(args.out, "choose another --out", folder=True)
    from mnist_cnn.distributed import current_world, destroy
    from mnist_cnn.figures import notebook_accuracy
    from mnist_cnn.train import Cadence, resume_run, train_new

    main = current_world().is_main
    say = print if main else (lambda *a, **k: None)
    cadence = Cadence.parse(args.checkpoint_every)
    try:
        if args.resume:
            if args.out or args.overwrite or args.resume_if_exists:
                raise UserError("--resume continues RUN_DIR in place: drop --out, --overwrite "
                                "and --resume-if-exists")  # fmt: skip
            result = resume_run(args.resume, device=args.device, threads=args.threads,
                                checkpoint_every=cadence)  # fmt: skip
        else:
            if args.resume_if_exists and (args.out is None or args.overwrite):
                raise UserError("--resume-if-exists needs --out RUN_DIR (the run to start or "
                                "continue) and no --overwrite")  # fmt: skip
            result = train_new(
                args.dataset, args.recipe, seed=args.seed, device=args.device, out=args.out,
                overwrite=args.overwrite, threads=args.threads, log=say,
                resume_if_exists=args.resume_if_exists, checkpoint_every=cadence,
                data_log=lambda msg: say(msg, file=sys.stderr), epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
                precision=args.precision, budget_s=args.budget,
            )  # fmt: skip
    finally:
        destroy()
    summary = result.summary
    if main and result.already_finished:
        print(f"{result.run_dir} has already finished (test accuracy "
              f"{summary['test_accuracy']:.4f}): nothing to do")  # fmt: skip
    elif main:
        line = f"final test accuracy {summary['test_accuracy']:.4f}"
        reference = notebook_accuracy(summary["dataset"])
        if reference is not None:
            line += f" (notebook: {reference:.4f})"
        print(f"{line}, {summary['train_seconds']:.1f} s of training; "
              f"run directory {result.run_dir}")  # fmt: skip
    return 0


def cmd_evaluate(args) -> int:
    from mnist_cnn.reports import evaluate_run
    from mnist_cnn.run import CONFUSION, MISTAKES, REPORT

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
    for flag, path in (("--plot", args.plot), ("--show-input", args.show_input)):
        check_output(path, f"choose another {flag}")
    import json

    import torch

    from mnist_cnn.images import load_image
    from mnist_cnn.predict import predict_records
    from mnist_cnn.run import WEIGHTS, Run

    if bool(args.images) == (args.index is not None):
        raise UserError("give image files or --index N (one of the two)")
    run = Run(args.run_dir)
    model = run.load_model()
    if args.index is not None:
        test = run.dataset.test
        if not 0 <= args.index < len(test):
            raise UserError(f"--index {args.index} is out of range: the test set has "
                            f"{len(test)} images (0..{len(test) - 1})")  # fmt: skip
        images = test.images[args.index : args.index + 1]
        names = [f"test[{args.index}]"]
    else:
        images = torch.stack([load_image(path, run.image_style) for path in args.images])
        names = [str(p) for p in args.images]
    records = predict_records(model, images, names, run.classes, args.top_k,
                              weights=run.path / WEIGHTS)  # fmt: skip
    for record in records:
        if args.json:
            print(json.dumps(record, allow_nan=False))
        else:
            others = ", ".join(f"{t['class_name']} {t['probability']:.4f}" for t in record["top_k"])
            print(f"{record['input']}: {record['class_name']}  (top {len(record['top_k'])}: "
                  f"{others})")  # fmt: skip
    sys.stdout.flush()
    _write_prediction_figures(args, model, images, names, run.classes)
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
    from mnist_cnn.io import atomic_path
    from mnist_cnn.metrics import predict_logits
    from mnist_cnn.paths import cannot_write

    probs = torch.softmax(predict_logits(model, images), dim=1)
    for i, name in enumerate(names):
        if args.plot:
            path = prediction_plot(images[i], probs[i], classes, name,
                                   _numbered(args.plot, i, len(names)))  # fmt: skip
            print(f"wrote {path}", file=sys.stderr)
        if args.show_input:
            path = _numbered(args.show_input, i, len(names))
            kind = Image.registered_extensions().get(path.suffix.lower(), "PNG")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    Image.fromarray(images[i].numpy()).save(tmp, format=kind)
            except OSError as exc:
                raise cannot_write(path, exc) from None
            print(f"wrote {path}", file=sys.stderr)


def cmd_explain(args) -> int:
    check_output(args.out, "choose another --out", folder=True)
    from mnist_cnn.explain import explain_run

    for path in explain_run(args.run_dir, args.index, args.out):
        print(f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    check_output(args.out, "choose another --out", folder=args.format == "web")
    from mnist_cnn.export import PARITY_TOLERANCE, export_onnx

    if args.runtime is not None and args.format != "web":
        raise UserError("--runtime is for --format web: add --format web, or drop --runtime")
    if args.format == "web":
        from mnist_cnn.web import export_web

        path, parity, size = export_web(args.run_dir, args.out, args.runtime)
        print(f"wrote {path}/ ({size / 1e6:.1f} MB): serve it with any static server, "
              f"e.g. python -m http.server -d {path}")  # fmt: skip
    else:
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
    # One subplot per image: 256 take ten seconds to draw, 60,000 would take an hour.
    p.add_argument("--n", type=_int_in(1, 256), default=64,
                   help="how many images (default 64, at most 256)")  # fmt: skip
    p.add_argument("--out", type=Path, help="PNG path (default NAME-SPLIT-samples.png)")
    p.set_defaults(func=cmd_data_show)

    p = commands.add_parser("train", help="train a model with a recipe; write a run directory")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder")
    p.add_argument(
        "--recipe", default="seed",
        help="seed (the notebook), fast (its accuracy in the least time), best (accuracy)",
    )  # fmt: skip
    p.add_argument("--epochs", type=_float_in(0, 10_000, low_open=True),
                   help="passes over the data (may be 1.5)")  # fmt: skip
    p.add_argument("--batch-size", type=_int_in(1, 1_000_000))
    p.add_argument("--lr", type=_float_in(0, 1e6, low_open=True), help="learning rate")
    p.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--threads", type=_int_in(1, 1024),
        help="CPU threads (default: every core it may use; two runs at once: give each half)",
    )  # fmt: skip
    p.add_argument(
        "--eval-every", type=_float_in(0, 1e9), metavar="SECONDS",
        help="evaluate every SECONDS of training and after each epoch (0: after epochs only)",
    )  # fmt: skip
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"],
        help="auto (the default): bf16 autocast where the hardware has it natively, else fp32",
    )  # fmt: skip
    p.add_argument(
        "--budget", type=_float_in(0, 1e8), metavar="SECONDS",
        help="train at most the epochs that fit in 80%% of SECONDS here, timed over a few "
        "steps first (0: no limit; the best recipe's is 600)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, metavar="RUN_DIR", help="default runs/DATASET-RECIPE-TIME")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument(
        "--resume-if-exists", action="store_true",
        help="with --out: start RUN_DIR if new, continue it from its last checkpoint if "
        "unfinished, do nothing if finished (for restarts by torchrun or a scheduler)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-every", default="epoch", metavar="N|Ns|epoch",
        help="a checkpoint every N steps or N seconds of training, besides each epoch's end "
        "(default: epoch ends only)",
    )  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("evaluate", help="accuracy, per-class table, confusion + mistakes")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("predict", help="classify image files or a test image")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE")
    p.add_argument("--index", type=_int_in(0, 2**31), metavar="N",
                   help="test image N of the run's data set")  # fmt: skip
    p.add_argument("--top-k", type=_positive_int, default=3)
    p.add_argument("--json", action="store_true", help="one JSON object per input, per line")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="the input as the model saw it beside its class probabilities")  # fmt: skip
    p.add_argument("--show-input", type=Path, metavar="FILE.png",
                   help="write the 28x28 image the model saw")  # fmt: skip
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("explain", help="filters.png and feature_maps.png for a test image")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--index", type=_int_in(0, 2**31), required=True, metavar="N",
                   help="test image N")  # fmt: skip
    p.add_argument("--out", type=Path, metavar="DIR", help="folder for the PNGs (default RUN_DIR)")
    p.set_defaults(func=cmd_explain)

    p = commands.add_parser("export", help="ONNX model, or the web page that runs it offline")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--format", default="onnx", choices=["onnx", "web"],
                   help="onnx: a model file; web: a static page that runs it")  # fmt: skip
    p.add_argument("--out", type=Path, metavar="FILE|DIR",
                   help="default RUN_DIR/model.onnx, or the folder RUN_DIR/web")  # fmt: skip
    p.add_argument("--runtime", type=Path, metavar="FILE.tgz",
                   help="web: onnxruntime-web's npm tarball, if offline")  # fmt: skip
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("serve", help="web page and JSON API: draw a digit, see the answer")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000,
                   help="default 8000; 0 picks a free port")  # fmt: skip
    p.set_defaults(func=cmd_serve)

    return parser


def main(argv: list[str] | None = None) -> int:
    if not sys.warnoptions and not os.environ.get("PYTHONWARNINGS"):
        # A library's warning is not the user's to act on; errors come as one line.
        warnings.simplefilter("ignore")
    try:
        args = build_parser().parse_args(argv)
        _check_cache_setting()
        return args.func(args)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        # The file system said no to a path the user chose (or one under it).
        where = exc.filename or "a file"
        print(f"{PROG}: error: cannot use {where} ({exc.strerror}): check the path and its "
              "permissions", file=sys.stderr)  # fmt: skip
        return 2
    except TrainingInterrupted as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
