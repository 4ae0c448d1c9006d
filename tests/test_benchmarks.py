"""The benchmark scripts and harness: they run, report every key and summarise correctly.

Nothing here asserts a timing: how fast a shared machine is says nothing about the code.
The scripts run on a few hundred images, so the file takes seconds, not minutes.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def load_module(name: str) -> ModuleType:
    """A benchmarks/ file as a module: benchmarks/ is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = load_module("harness")
measure = load_module("measure")

TINY = ["--dataset", "mnist", "--epochs", "1", "--train-limit", "512", "--test-limit", "200"]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- the two sides ----------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["reference.py", "ours.py"])
def test_script_prints_one_json_line_with_every_key(script):
    done = run_script(script, *TINY, "--seed", "1", "--target", "0.05", "--eval-repeats", "1",
                      "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    record = json.loads(lines[0])
    assert set(measure.RESULT_KEYS) <= set(record)
    assert len(record["epoch_seconds"]) == 1
    assert record["epoch_seconds"][0] > 0
    assert record["eval_seconds"] > 0
    assert 0.0 <= record["test_accuracy"] <= 1.0
    assert record["peak_rss_mb"] > 0
    assert record["test_images"] == 200
    # Any model beats 5% on ten balanced classes, so the target is met after epoch 1.
    assert record["time_to_target"] == pytest.approx(record["epoch_seconds"][0], abs=1e-3)
    assert "epoch 1:" in done.stderr  # the readable lines move to stderr
    assert "final test accuracy" in done.stderr


@pytest.fixture(scope="module")
def keras_python() -> Path:
    """The Keras side's interpreter (`make keras-env`), if it has TensorFlow; else skip."""
    python = harness.KERAS_PYTHON
    if not python.exists():
        pytest.skip("no .venv-keras: `make keras-env` installs the Keras side")
    done = subprocess.run([str(python), "-c", "import keras, tensorflow"], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"{python} cannot import TensorFlow and Keras")
    return python


def option_strings(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def test_keras_script_takes_the_same_flags_and_prints_the_same_keys(keras_python):
    script = str(BENCHMARKS / "keras_reference.py")
    done = subprocess.run(
        [str(keras_python), script, *TINY, "--seed", "1", "--target", "0.05",
         "--eval-repeats", "1", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    record = json.loads(lines[0])
    assert set(measure.RESULT_KEYS) <= set(record)
    assert len(record["epoch_seconds"]) == 1 and record["epoch_seconds"][0] > 0
    assert record["eval_seconds"] > 0
    assert 0.0 <= record["test_accuracy"] <= 1.0
    assert record["peak_rss_mb"] > 0
    assert record["test_images"] == 200
    assert record["time_to_target"] == pytest.approx(record["epoch_seconds"][0], abs=1e-3)
    assert record["precision"] == "fp32" and record["threads"] >= 1
    assert record["side"] == "keras" and "TensorFlow" in record["versions"]
    assert "epoch 1:" in done.stderr and "final test accuracy" in done.stderr

    helped = subprocess.run([str(keras_python), script, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    flags = {word.strip(",[]") for word in helped.stdout.split() if word.startswith(("--", "[--"))}
    assert flags == option_strings(measure.common_parser("")) - {"-h"}

    refused = subprocess.run(
        [str(keras_python), script, "--dataset", "no-such-set", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "keras_reference.py: error: unknown data set 'no-such-set'" in refused.stderr


def test_script_refuses_an_unknown_data_set_in_one_line():
    done = run_script("reference.py", "--dataset", "no-such-set", "--json")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "unknown data set 'no-such-set'" in done.stderr


# --- the shared measurements ------------------------------------------------------------------


def test_time_to_target_is_the_first_evaluation_that_reaches_it():
    accuracies, seconds = [0.95, 0.981, 0.979, 0.99], [2.0, 4.0, 6.0, 8.0]
    assert measure.time_to_target(accuracies, seconds, 0.98) == 4.0
    assert measure.time_to_target(accuracies, seconds, 0.995) is None
    assert measure.time_to_target(accuracies, seconds, None) is None


def test_median_seconds_times_only_the_calls_after_the_warm_up():
    calls = []
    measure.median_seconds(lambda: calls.append(1), repeats=3)
    assert len(calls) == 4


# --- the harness's arithmetic -----------------------------------------------------------------


def canned(epoch_seconds, eval_seconds, accuracy, rss, reached, *, precision="fp32") -> dict:
    return {
        "epoch_seconds": epoch_seconds,
        "eval_seconds": eval_seconds,
        "test_accuracy": accuracy,
        "peak_rss_mb": rss,
        "time_to_target": reached,
        "epoch_accuracies": [accuracy] * len(epoch_seconds),
        "test_images": 10_000,
        "threads": 2,
        "precision": precision,
    }


OURS = [
    canned([2.0, 2.2], 0.30, 0.981, 400.0, 4.2, precision="bf16"),
    canned([2.1, 1.9], 0.20, 0.982, 410.0, 4.0, precision="bf16"),
    canned([2.4, 2.0], 0.40, 0.979, 390.0, None, precision="bf16"),
]
REFERENCE = [
    canned([8.0, 8.4], 1.00, 0.980, 500.0, 16.4),
    canned([7.6, 8.0], 1.20, 0.975, 520.0, None),
    canned([8.2, 8.0], 0.80, 0.970, 510.0, None),
]


def test_seconds_per_epoch_scales_a_last_part_of_an_epoch_to_a_whole_one():
    """A run of 1.6 epochs: its last stretch is 0.6 of an epoch, not an epoch."""
    history = [
        {"epoch": 0.0, "step": 0, "seconds": 0.0},
        {"epoch": 1.0, "step": 469, "seconds": 3.0},
        {"epoch": 1.6, "step": 751, "seconds": 4.8},
    ]
    assert measure.seconds_per_epoch(history) == pytest.approx([3.0, 3.0])


def test_median_or_none_treats_none_as_never():
    assert harness.median_or_none([3.0, None, 1.0]) == 3.0
    assert harness.median_or_none([None, None, 1.0]) is None
    assert harness.median_or_none([1.0, 2.0]) == 1.5
    assert harness.median_or_none([1.0, None]) is None
    assert harness.median_or_none([]) is None


def test_summarize_takes_medians_over_repetitions_and_over_all_epochs():
    ours = harness.summarize(OURS)
    assert ours["epoch_seconds"] == pytest.approx(2.05)  # median of six epochs
    assert ours["fastest_epoch_seconds"] == pytest.approx(1.9)
    assert ours["eval_seconds"] == pytest.approx(0.30)
    assert ours["time_to_target"] == pytest.approx(4.2)  # 4.0, 4.2, never
    assert ours["reached"] == 2
    assert ours["peak_rss_mb"] == 400.0
    assert ours["test_accuracy"] == pytest.approx(0.981)
    assert harness.summarize(REFERENCE)["time_to_target"] is None  # two of three never


def test_ratio_is_ours_over_reference_and_undefined_without_both():
    assert harness.ratio(2.0, 8.0) == 0.25
    assert harness.ratio(None, 8.0) is None
    assert harness.ratio(2.0, None) is None
    assert harness.ratio(2.0, 0.0) is None


def test_table_has_a_row_per_measure_with_both_sides_and_their_ratio():
    ours, reference = harness.summarize(OURS), harness.summarize(REFERENCE)
    rows = harness.table_rows(ours, reference, epochs=2, target=0.98)
    by_measure = {row[0]: row[1:] for row in rows}
    assert by_measure["seconds per epoch"] == ["2.05", "8.00", "0.26"]
    assert by_measure["seconds of the fastest epoch (least disturbed by other load)"] == [
        "1.90",
        "7.60",
        "0.25",
    ]
    assert by_measure["seconds to evaluate 10,000 test images"] == ["0.300", "1.000", "0.30"]
    assert by_measure["training seconds to 0.98 test accuracy"] == [
        "4.20 (2 of 3 reps reached it)",
        "not reached in 2 epochs",
        "n/a",
    ]
    assert by_measure["peak RSS (MB)"] == ["400", "510", "0.78"]
    table = harness.markdown_table(rows).splitlines()
    assert table[0] == "| measure | ours | reference | ours / reference |"
    assert table[2] == "| seconds per epoch | 2.05 | 8.00 | 0.26 |"
    assert len(table) == 2 + len(rows)


KERAS = [
    canned([2.5, 2.3], 0.25, 0.978, 800.0, None),
    canned([2.4, 2.6], 0.35, 0.983, 790.0, 5.0),
    canned([2.2, 2.4], 0.30, 0.980, 810.0, 4.8),
]


def test_table_with_keras_adds_its_column_and_ours_over_keras():
    ours, reference, keras = (harness.summarize(r) for r in (OURS, REFERENCE, KERAS))
    rows = harness.table_rows(ours, reference, epochs=2, target=0.98, keras=keras)
    by_measure = {row[0]: row[1:] for row in rows}
    assert by_measure["seconds per epoch"] == ["2.05", "8.00", "2.40", "0.26", "0.85"]
    assert by_measure["training seconds to 0.98 test accuracy"] == [
        "4.20 (2 of 3 reps reached it)",
        "not reached in 2 epochs",
        "5.00 (2 of 3 reps reached it)",
        "n/a",
        "0.84",
    ]
    table = harness.markdown_table(rows).splitlines()
    assert table[0] == "| measure | ours | reference | keras | ours / reference | ours / keras |"
    assert table[1] == "| --- | ---: | ---: | ---: | ---: | ---: |"
    assert table[2] == "| seconds per epoch | 2.05 | 8.00 | 2.40 | 0.26 | 0.85 |"


def test_results_file_starts_with_the_header_then_gains_one_section_per_run(tmp_path):
    results = tmp_path / "RESULTS.md"
    harness.append_results("## first\n", results)
    harness.append_results("## second\n", results)
    text = results.read_text()
    assert text.startswith(harness.RESULTS_HEADER)
    assert text.index("## first") < text.index("## second")
    assert text.endswith("## second\n")


def test_results_section_records_command_machine_and_table():
    args = harness.build_parser().parse_args(["--epochs", "2", "--reps", "3"])
    section = harness.results_section(
        when=harness.datetime.datetime(2025, 1, 2, 3, 4),
        command="python benchmarks/harness.py --epochs 2 --reps 3",
        args=args,
        ours=harness.summarize(OURS),
        reference=harness.summarize(REFERENCE),
        other_share=0.25,
        minutes=3.0,
        records={"ours": OURS, "reference": REFERENCE},
    )
    assert section.startswith("## 2025-01-02 03:04 UTC: mnist, recipe seed")
    assert "`python benchmarks/harness.py --epochs 2 --reps 3`" in section
    assert "torch " in section
    assert "25% of all cores" in section
    assert "ours, rep by rep: 2.00, 2.20; 2.10, 1.90; 2.40, 2.00" in section
    assert "| seconds per epoch | 2.05 | 8.00 | 0.26 |" in section


# --- which sides run -----------------------------------------------------------------------------


def fake_sides(monkeypatch, results) -> list[tuple[str, int]]:
    """Replace the side processes by canned records; return the (side, seed) calls made."""
    calls = []
    canned_by_side = {"ours": OURS, "reference": REFERENCE, "keras": KERAS}

    def run_side(side, args, seed):
        calls.append((side, seed))
        return canned_by_side[side][seed]

    monkeypatch.setattr(harness, "run_side", run_side)
    monkeypatch.setattr(harness, "RESULTS", results)
    return calls


def test_harness_skips_the_keras_side_with_a_note_without_a_keras_python(
    monkeypatch, capsys, tmp_path
):
    monkeypatch.setattr(harness, "KERAS_PYTHON", tmp_path / "absent" / "python")
    results = tmp_path / "RESULTS.md"
    calls = fake_sides(monkeypatch, results)
    assert harness.main(["--reps", "2"]) == 0
    assert calls == [("ours", 0), ("reference", 0), ("ours", 1), ("reference", 1)]
    out, err = capsys.readouterr()
    assert err.splitlines()[0] == harness.KERAS_SKIPPED
    assert "`make keras-env`" in harness.KERAS_SKIPPED
    assert out.splitlines()[0] == "| measure | ours | reference | ours / reference |"
    section = results.read_text()
    assert "- Keras side: skipped (no Keras python; `make keras-env` installs one)" in section
    assert "threads 2 / 2" in section and "keras," not in section


def test_harness_runs_keras_third_in_each_repetition_with_a_keras_python(
    monkeypatch, capsys, tmp_path
):
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    results = tmp_path / "RESULTS.md"
    calls = fake_sides(monkeypatch, results)
    for record in KERAS:
        monkeypatch.setitem(record, "versions", "TensorFlow 9.9, Keras 9.9")
        monkeypatch.setitem(record, "jit_compile", False)
    assert harness.main(["--reps", "2", "--keras-python", str(python)]) == 0
    assert [side for side, _ in calls] == ["ours", "reference", "keras"] * 2
    out, err = capsys.readouterr()
    assert harness.KERAS_SKIPPED not in err
    assert out.splitlines()[0].endswith("| keras | ours / reference | ours / keras |")
    section = results.read_text()
    assert "reference in fp32, keras in fp32; threads 2 / 2 / 2" in section
    assert "- Keras side: TensorFlow 9.9, Keras 9.9, jit_compile False, run by `" in section
    assert "keras, rep by rep: 2.50, 2.30; 2.40, 2.60" in section
    command = harness.side_command("keras", harness.build_parser().parse_args(
        ["--keras-python", str(python)]), 0)  # fmt: skip
    assert command[:2] == [str(python), str(BENCHMARKS / "keras_reference.py")]


def test_harness_refuses_a_keras_python_that_is_not_there(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        harness.main(["--keras-python", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    assert "--keras-python: " in capsys.readouterr().err


# --- end to end ---------------------------------------------------------------------------------


def test_harness_end_to_end_prints_a_table_of_both_sides_and_records_nothing(
    capsys, monkeypatch, tmp_path
):
    monkeypatch.setattr(harness, "KERAS_PYTHON", tmp_path / "absent" / "python")
    before = harness.RESULTS.read_bytes() if harness.RESULTS.exists() else None
    code = harness.main(
        ["--reps", "1", "--epochs", "1", "--train-limit", "2000", "--test-limit", "500",
         "--no-record"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "| measure | ours | reference | ours / reference |"
    assert len(lines) == 8
    epoch_row = next(line for line in lines if line.startswith("| seconds per epoch |"))
    ours, reference, ratio = (cell.strip() for cell in epoch_row.strip("|").split("|")[1:])
    assert float(ours) > 0 and float(reference) > 0 and float(ratio) > 0
    after = harness.RESULTS.read_bytes() if harness.RESULTS.exists() else None
    assert after == before


def test_bench_is_a_script_not_a_command(run_cli):
    """The harness lives under benchmarks/, beside the reference it measures against: the
    installed command line does not pretend to ship it."""
    code, _, err = run_cli("bench")
    assert code == 2 and "invalid choice: 'bench'" in err
    done = run_script("harness.py", "--reps", "0")
    assert done.returncode == 2
    assert "--reps: 0 must be at least 1" in done.stderr


# --- the accelerator script --------------------------------------------------------------------


def test_gpu_script_prints_a_results_section_and_runs_on_cpu_too():
    tiny = ["--train-limit", "512", "--test-limit", "200", "--eval-repeats", "1"]
    done = run_script("gpu.py", "--device", "cpu", "--seeds", "0", "1", "--seed-epochs", "2", *tiny)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("## ") and lines[0].endswith("(benchmarks/gpu.py)")
    rows = [line.split(" | ") for line in lines if line.startswith(("| fast", "| seed"))]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        ("| fast", "mnist", "0"), ("| fast", "mnist", "1"),
        ("| fast", "fashion-mnist", "0"), ("| fast", "fashion-mnist", "1"),
        ("| seed", "mnist", "0"),
    ]  # fmt: skip
    for row in rows:
        assert 0 <= float(row[3]) <= 1 and float(row[5].rstrip(" |")) > 0
    epochs = next(line for line in lines if line.startswith("- Seed recipe, seconds"))
    assert len(epochs.split(":")[1].split(",")) == 2
    assert "Evaluating 200 test images" in done.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_gpu_script_without_a_gpu_is_a_one_line_error():
    done = run_script("gpu.py", "--train-limit", "64", "--test-limit", "64")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu.py: error: --device cuda was asked for but no CUDA GPU is visible: use --device cpu"
    ]
