"""Our tool against plain PyTorch, measured in the same run on the same machine.

Each repetition runs `ours.py` then `reference.py`, each in a fresh process, so both sides
see the same slow drifts of a shared machine (thermal state, other jobs) and neither
inherits the other's memory or threads. Figures are medians over repetitions (and, for
seconds per epoch, over epochs too); the ratio ours/reference is what to quote, because
absolute seconds move with the machine while the ratio mostly does not.

A third side is optional: the same network in Keras 3 on TensorFlow (`keras_reference.py`),
run by the Python of `.venv-keras` (`make keras-env`) or of `--keras-python`, third in each
repetition. Without one it is skipped with a note, and the table keeps its two sides.

    python benchmarks/harness.py --dataset mnist --epochs 2 --reps 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {
    "ours": HERE / "ours.py",
    "reference": HERE / "reference.py",
    "keras": HERE / "keras_reference.py",
}
# The Keras side's interpreter: TensorFlow lives in a venv of its own, never in .venv.
KERAS_PYTHON = HERE.parent / ".venv-keras" / "bin" / "python"
KERAS_SKIPPED = (
    "note: the Keras side is skipped: no .venv-keras/bin/python (`make keras-env` "
    "installs it; or pass --keras-python PATH)"
)
RESULTS = HERE / "RESULTS.md"

RESULTS_HEADER = """\
# Benchmark results

Each section below was appended by `benchmarks/harness.py` (older ones by its former
name, `mnist-cnn bench`). It trains the seed network with our tool (`benchmarks/ours.py`:
`mnist_cnn.fit`, one recipe) and with the plain PyTorch a user would write instead
(`benchmarks/reference.py`: a per-image `Dataset`, `DataLoader(batch_size=128,
shuffle=True)`, Adam 1e-3, default initialisation), alternating ours, reference, ours,
reference, ... in fresh processes.

- Every figure is a median: over repetitions, and for seconds per epoch over every epoch
  of every repetition. Training seconds exclude evaluation on both sides. The fastest
  epoch is there too because a shared machine only ever slows an epoch down: the minimum
  is the figure least disturbed by other work.
- Evaluation seconds: the median of a few passes over the test set after one warm-up.
- Time to target: training seconds until the test accuracy, checked after each epoch,
  first reaches the target ("not reached" if it does not within the epochs run).
- Peak RSS: `ru_maxrss` of each process, data set included.
- **ours / reference** compares two measurements taken in the same run on the same
  machine; below 1 means ours is faster or smaller. Quote the ratio, not the seconds:
  absolute times move with the machine and whatever else it runs.
- "Other load" is the CPU time used by processes outside the benchmark while it ran, as
  a share of all cores; above a few percent, the absolute seconds are inflated.
- An optional third side, **keras** (`benchmarks/keras_reference.py`: the same network in
  Keras 3 on TensorFlow, `model.fit` on numpy arrays), runs after the other two in each
  repetition where `make keras-env` has installed it; its columns are the Keras figures
  and **ours / keras**. A section without them says the Keras side was skipped.
"""


# --- running the two sides ------------------------------------------------------------------


def side_command(side: str, args: argparse.Namespace, seed: int) -> list[str]:
    python = str(args.keras_python) if side == "keras" else sys.executable
    command = [
        python, str(SCRIPTS[side]), "--json", "--dataset", args.dataset,
        "--epochs", str(args.epochs), "--seed", str(seed), "--target", str(args.target),
    ]  # fmt: skip
    if side == "ours":
        command += ["--recipe", args.recipe]
    for flag, value in (("--train-limit", args.train_limit), ("--test-limit", args.test_limit)):
        if value is not None:
            command += [flag, str(value)]
    return command


class SideFailed(Exception):
    """A benchmark script exited non-zero; carries its exit code and its last words.

    Exit 2 is bad input (an unknown data set or recipe) and its last line says so; any
    other failure is unexpected, so the message keeps the end of the traceback.
    """

    def __init__(self, side: str, code: int, stderr: str):
        lines = stderr.strip().splitlines() or ["(no output on stderr)"]
        if code == 2:
            message = lines[-1]
        else:
            message = f"{SCRIPTS[side].name} failed with exit code {code}:\n" + "\n".join(
                lines[-8:]
            )
        super().__init__(message)
        self.code = code


def run_side(side: str, args: argparse.Namespace, seed: int) -> dict:
    """Run one side in a fresh process and return its JSON record."""
    done = subprocess.run(side_command(side, args, seed), capture_output=True, text=True)
    if done.returncode != 0:
        raise SideFailed(side, done.returncode, done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SideFailed(side, 1, f"no JSON line on stdout:\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1])


# --- summarising ----------------------------------------------------------------------------


def median_or_none(values: Sequence[float | None]) -> float | None:
    """Median where None means "never" (sorts after every number); None if the median is never."""
    if not values:
        return None
    ordered = sorted(math.inf if v is None else v for v in values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return None if math.isinf(median) else median


def summarize(records: Sequence[dict]) -> dict:
    """One side's medians over its repetitions."""
    return {
        "epoch_seconds": statistics.median(s for r in records for s in r["epoch_seconds"]),
        "fastest_epoch_seconds": min(s for r in records for s in r["epoch_seconds"]),
        "eval_seconds": statistics.median(r["eval_seconds"] for r in records),
        "time_to_target": median_or_none([r["time_to_target"] for r in records]),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in records),
        "test_accuracy": statistics.median(r["test_accuracy"] for r in records),
        "reached": sum(r["time_to_target"] is not None for r in records),
        "reps": len(records),
        "test_images": records[0]["test_images"],
        "precision": records[0].get("precision"),
        "threads": records[0].get("threads"),
    }


def ratio(ours: float | None, reference: float | None) -> float | None:
    if ours is None or reference is None or reference == 0:
        return None
    return ours / reference


def table_rows(
    ours: dict, reference: dict, *, epochs: int, target: float, keras: dict | None = None
) -> list[list[str]]:
    """[measure, ours, reference, ours/reference] for each measure, formatted; with `keras`,
    [measure, ours, reference, keras, ours/reference, ours/keras]."""

    def reached(summary: dict) -> str:
        value = summary["time_to_target"]
        if value is None:
            return f"not reached in {epochs} epochs"
        if summary["reached"] < summary["reps"]:
            return f"{value:.2f} ({summary['reached']} of {summary['reps']} reps reached it)"
        return f"{value:.2f}"

    def fmt_ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    others = [reference] if keras is None else [reference, keras]

    def cells(label: str, key: str, show) -> list[str]:
        values = [show(summary) for summary in (ours, *others)]
        return [label, *values, *(fmt_ratio(ratio(ours[key], o[key])) for o in others)]

    def row(label: str, key: str, digits: int) -> list[str]:
        return cells(label, key, lambda summary: f"{summary[key]:.{digits}f}")

    n_test = f"{ours['test_images']:,}"
    return [
        row("seconds per epoch", "epoch_seconds", 2),
        row(
            "seconds of the fastest epoch (least disturbed by other load)",
            "fastest_epoch_seconds",
            2,
        ),
        row(f"seconds to evaluate {n_test} test images", "eval_seconds", 3),
        cells(f"training seconds to {target:g} test accuracy", "time_to_target", reached),
        row("peak RSS (MB)", "peak_rss_mb", 0),
        row(f"test accuracy after {epochs} epochs", "test_accuracy", 4),
    ]


HEADERS = {
    4: ["measure", "ours", "reference", "ours / reference"],
    6: ["measure", "ours", "reference", "keras", "ours / reference", "ours / keras"],
}


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """The rows of `table_rows` under their header: two sides, or three with Keras."""
    header = HEADERS[len(rows[0])]
    lines = [header, ["---"] + ["---:"] * (len(header) - 1), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


# --- the machine ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def machine_description() -> str:
    import torch

    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    ram = ram_gib()
    return (
        f"{cpu_model()}, {cores} cores ({usable} usable), "
        f"{f'{ram:.1f} GiB RAM' if ram is not None else 'RAM unknown'}, "
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}"
    )


def busy_cpu_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the benchmark itself)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class LoadMeter:
    """The share of all cores that processes outside the benchmark used while it ran.

    A shared machine inflates absolute seconds; this says by how much to distrust them.
    """

    def __init__(self):
        self.wall = time.monotonic()
        self.busy = busy_cpu_seconds()
        self.own = own_cpu_seconds()

    def other_share(self) -> float | None:
        busy = busy_cpu_seconds()
        if busy is None or self.busy is None:
            return None
        capacity = (time.monotonic() - self.wall) * (os.cpu_count() or 1)
        other = (busy - self.busy) - (own_cpu_seconds() - self.own)
        return max(0.0, other) / capacity if capacity > 0 else None


# --- recording ------------------------------------------------------------------------------


def results_section(
    *,
    when: datetime.datetime,
    command: str,
    args: argparse.Namespace,
    ours: dict,
    reference: dict,
    other_share: float | None,
    minutes: float,
    records: dict[str, list[dict]] | None = None,
    keras: dict | None = None,
) -> str:
    """One RESULTS.md section; `keras` is the Keras side's summary, None where it was skipped."""
    title = f"## {when:%Y-%m-%d %H:%M} UTC: {args.dataset}, recipe {args.recipe}"
    load = "unknown" if other_share is None else f"{other_share:.0%} of all cores"
    others = [("reference", reference)] + ([("keras", keras)] if keras else [])
    precisions = "".join(f", {name} in {summary['precision']}" for name, summary in others)
    threads = " / ".join(str(s["threads"]) for s in (ours, *(summary for _, summary in others)))
    settings = f"ours trains in {ours['precision']}{precisions}; threads {threads}"
    if keras is None:
        keras_line = "- Keras side: skipped (no Keras python; `make keras-env` installs one)"
    else:
        python = short_path(str(args.keras_python or KERAS_PYTHON))
        keras_line = (
            f"- Keras side: {keras['versions']}, jit_compile {keras['jit_compile']}, "
            f"run by `{python}`"
        )
    rows = table_rows(ours, reference, epochs=args.epochs, target=args.target, keras=keras)
    lines = [
        title,
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine_description()}",
        f"- Run: {args.reps} repetitions of {args.epochs} epochs per side, "
        f"{minutes:.1f} minutes in all; {settings}",
        f"- Other load while it ran: {load}",
        keras_line,
    ]
    for side, side_records in (records or {}).items():
        per_rep = "; ".join(", ".join(f"{s:.2f}" for s in r["epoch_seconds"]) for r in side_records)
        lines.append(f"- Seconds of each epoch, {side}, rep by rep: {per_rep}")
    return "\n".join([*lines, "", markdown_table(rows), ""])


def append_results(section: str, path: Path = RESULTS) -> None:
    text = path.read_text() if path.exists() else RESULTS_HEADER
    path.write_text(text.rstrip("\n") + "\n\n" + section)


# --- command line ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line and exit 2, like every `mnist-cnn` command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog, description="Benchmark our training against plain PyTorch, in one run."
    )
    parser.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or a folder")
    parser.add_argument("--epochs", type=_positive_int, default=2, help="per run (default 2)")
    parser.add_argument("--reps", type=_positive_int, default=3, help="per side (default 3)")
    parser.add_argument("--target", type=float, default=0.98, help="test accuracy to time to")
    parser.add_argument("--recipe", default="seed", help="our recipe (default seed)")
    parser.add_argument("--seed", type=int, default=0, help="repetition i uses seed SEED+i")
    parser.add_argument("--train-limit", type=_positive_int, metavar="N", help="first N images")
    parser.add_argument("--test-limit", type=_positive_int, metavar="N", help="first N images")
    parser.add_argument(
        "--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md"
    )
    parser.add_argument(
        "--keras-python",
        type=Path,
        metavar="PATH",
        help="the Python that runs the optional Keras side (default .venv-keras/bin/python "
        "where `make keras-env` made it; skipped without one)",
    )
    return parser


def short_path(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def default_command(argv: Sequence[str]) -> str:
    return shlex.join([short_path(sys.executable), short_path(__file__), *argv])


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark; `prog` names the command in help and in the recorded command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.keras_python is not None and not os.access(args.keras_python, os.X_OK):
        parser.error(f"--keras-python: {args.keras_python} is not an executable file")
    if args.keras_python is None and os.access(KERAS_PYTHON, os.X_OK):
        args.keras_python = KERAS_PYTHON
    if args.keras_python is None:
        print(KERAS_SKIPPED, file=sys.stderr)
    sides = ("ours", "reference") if args.keras_python is None else ("ours", "reference", "keras")
    command = f"{prog} {shlex.join(argv)}" if prog else default_command(argv)
    when = datetime.datetime.now(datetime.timezone.utc)
    meter = LoadMeter()
    records: dict[str, list[dict]] = {side: [] for side in sides}
    try:
        for rep in range(args.reps):
            for side in sides:
                record = run_side(side, args, args.seed + rep)
                records[side].append(record)
                seconds = ", ".join(f"{s:.2f}" for s in record["epoch_seconds"])
                print(
                    f"rep {rep + 1}/{args.reps} {side:<9} epochs [{seconds}] s, "
                    f"accuracy {record['test_accuracy']:.4f}",
                    file=sys.stderr,
                )
    except SideFailed as exc:
        print(exc, file=sys.stderr)
        return 2 if exc.code == 2 else 1
    ours, reference = summarize(records["ours"]), summarize(records["reference"])
    keras = summarize(records["keras"]) if "keras" in records else None
    if keras is not None:  # what the summary drops, for the results section
        keras.update({k: records["keras"][0].get(k) for k in ("versions", "jit_compile")})
    rows = table_rows(ours, reference, epochs=args.epochs, target=args.target, keras=keras)
    print(markdown_table(rows))
    if not args.no_record:
        section = results_section(
            when=when,
            command=command,
            args=args,
            ours=ours,
            reference=reference,
            other_share=meter.other_share(),
            minutes=(time.monotonic() - meter.wall) / 60,
            records=records,
            keras=keras,
        )
        append_results(section, RESULTS)
        print(f"appended to {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
