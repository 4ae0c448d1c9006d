"""The `mnist-cnn` command line: parsing and printing only; each command calls the library.

Exit codes: 0 success, 1 unexpected failure, 2 bad input or usage (one line on stderr),
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnist_cnn.errors import UserError

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
    from mnist_cnn.data import CATALOG
    from mnist_cnn.data.fetch import cache_root, cache_status, configured_sources, recorded_source

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
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
