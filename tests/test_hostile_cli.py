"""Hostile and unlucky input through the command line: every case is exit 2 and one line on
stderr naming the problem and its fix (no traceback, no library warning), and nothing
half-written is left behind."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from mnist_cnn import build_model, fit, load_dataset
from mnist_cnn.run import CHECKPOINT, CONFIG, LOCK, SUMMARY, WEIGHTS

PREFIX = "mnist-cnn: error: "


def one_line(result, *words: str) -> str:
    """The single error line of a refused command, checked to contain each of `words`."""
    code, out, err = result
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX), err
    assert "Traceback" not in err and "Warning" not in err, err
    assert "NaN" not in out, out
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def leftovers(*folders: Path) -> list[Path]:
    """Temp files an atomic write cut short would leave (`.NAME.RANDOM.partial`)."""
    return [p for folder in folders if folder.is_dir()
            for pattern in (".*.partial", ".*.tmp") for p in folder.rglob(pattern)]  # fmt: skip


@pytest.fixture(scope="module")
def digits(real_digits) -> Path:
    """640 training and 200 test digits of MNIST, as an MNIST-format folder."""
    return real_digits(640, 200)


@pytest.fixture(scope="module")
def finished(digits, tmp_path_factory) -> Path:
    """A finished run of one epoch on `digits`: never written by a test (copy it first)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    torch.manual_seed(0)
    fit(build_model("seed"), load_dataset(digits), "seed", epochs=1, eval_every=0, out=out,
        threads=1, progress=False, log=None)  # fmt: skip
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    """A copy of the finished run, for a case to damage."""
    return Path(shutil.copytree(finished, tmp_path / "copy", ignore=shutil.ignore_patterns(LOCK)))


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A regular file: any path under it can be neither created nor written, even by root."""
    path = tmp_path / "blocker"
    path.write_text("a file, not a folder")
    return path


# --- numbers and settings that argparse refuses (no PyTorch is loaded for these) ------------

TRAIN_SETTINGS = [
    (["--epochs", "inf"], "--epochs: inf must be more than 0"),
    (["--epochs", "nan"], "--epochs: nan must be more than 0"),
    (["--epochs", "1e300"], "at most 10000"),
    (["--lr", "inf"], "--lr: inf must be more than 0"),
    (["--lr", "nan"], "--lr: nan must be more than 0"),
    (["--seed", "18446744073709551616"], "--seed: 18446744073709551616 must lie in 0..4294967295"),
    (["--seed", "-1"], "--seed: -1 must lie in 0.."),
    (["--seed", "1.5"], "--seed: '1.5' is not an integer"),
    (["--batch-size", "0"], "--batch-size: 0 must lie in 1.."),
    (["--threads", "0"], "--threads: 0 must lie in 1..1024"),
    (["--eval-every", "-1"], "--eval-every: -1 must be at least 0"),
    (["--eval-every", "inf"], "--eval-every: inf must be at least 0"),
]


@pytest.mark.parametrize(("args", "message"), TRAIN_SETTINGS, ids=lambda a: " ".join(a))
def test_train_refuses_numbers_out_of_range(run_cli, tmp_path, args, message):
    line = one_line(run_cli("train", "--out", tmp_path / "run", *args), message)
    assert "--help" in line  # where to look for what is allowed
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["serve", "RUN", "--port", "70000"], "--port: 70000 must lie in 0..65535"),
     (["serve", "RUN", "--port", "-1"], "--port: -1 must lie in 0..65535"),
     (["predict", "RUN", "--index", "0", "--top-k", "0"], "--top-k: 0 must lie in 1.."),
     (["predict", "RUN", "--index", "-1"], "--index: -1 must lie in 0.."),
     (["predict", "RUN", "--index", str(10**30)], "must lie in 0..2147483648"),
     (["explain", "RUN", "--index", "-1"], "--index: -1 must lie in 0.."),
     (["data", "show", "mnist", "--n", "0"], "--n: 0 must lie in 1..256"),
     (["data", "show", "mnist", "--n", "60000"], "--n: 60000 must lie in 1..256")],
    ids=lambda a: " ".join(a),
)  # fmt: skip
def test_other_commands_refuse_numbers_out_of_range(run_cli, tmp_path, args, message):
    one_line(run_cli(*args), message, "--help")
    assert list(tmp_path.iterdir()) == []


# --- the environment ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK"),
     ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer: unset it"),
     ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"}, "MASTER_PORT='99999' is not a port")],
    ids=["WORLD_SIZE=2", "WORLD_SIZE=abc", "MASTER_PORT=99999"],
)  # fmt: skip
def test_train_outside_torchrun_with_a_world_size_is_refused(run_cli, digits, tmp_path, env,
                                                            message):  # fmt: skip
    line = one_line(run_cli("train", "--dataset", digits, "--out", tmp_path / "run", env=env),
                    message)  # fmt: skip
    assert "torchrun" in line
    assert not (tmp_path / "run").exists()


def test_a_cache_that_cannot_be_a_folder_is_refused_before_any_work(run_cli, blocker, tmp_path):
    line = one_line(run_cli("data", "list", env={"MNIST_CNN_CACHE": str(blocker)}),
                    f"MNIST_CNN_CACHE={blocker} is a file")  # fmt: skip
    assert "point MNIST_CNN_CACHE at a folder" in line
    under = blocker / "cache"  # a folder nobody, root included, can create
    result = run_cli("train", "--out", tmp_path / "run", env={"MNIST_CNN_CACHE": str(under)})
    line = one_line(
        result, f"MNIST_CNN_CACHE={under} cannot be made a folder ({blocker} is a file)"
    )
    assert "point MNIST_CNN_CACHE at a folder" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
    assert blocker.read_text() == "a file, not a folder"


# --- output paths that cannot be written ------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "target", "reason"),
    [("--plot", "blocker/seen.png", "blocker is a file, not a folder"),
     ("--show-input", "blocker/seen.png", "blocker is a file, not a folder"),
     ("--show-input", ".", "it is a folder: give a file name")],
    ids=["plot-under-a-file", "show-input-under-a-file", "show-input-a-folder"],
)  # fmt: skip
def test_predict_figures_to_places_that_cannot_be_written(run_cli, finished, blocker, tmp_path,
                                                         flag, target, reason):  # fmt: skip
    target = tmp_path / target
    code, out, err = run_cli("predict", finished, "--index", "0", "--json", flag, target)
    one_line((code, out, err), f"cannot write {target}", reason, f"choose another {flag}")
    assert out == ""  # refused before any work
    assert leftovers(tmp_path, finished) == []


def test_a_figure_refused_by_the_file_system_is_one_clear_error_and_leaves_nothing(tmp_path):
    import matplotlib.pyplot as plt

    from mnist_cnn.errors import UserError
    from mnist_cnn.figures import save_figure

    (tmp_path / "taken.png").mkdir()  # found only when the rendered figure is renamed
    with pytest.raises(UserError) as refused:
        save_figure(plt.figure(), tmp_path / "taken.png")
    assert str(refused.value) == (f"cannot write {tmp_path / 'taken.png'} (it is a folder: give "
                                  "a file name): choose another path")  # fmt: skip
    assert leftovers(tmp_path) == [] and plt.get_fignums() == []


def test_data_show_to_a_place_that_cannot_be_written(run_cli, digits, blocker, tmp_path):
    target = blocker / "grid.png"
    one_line(run_cli("data", "show", digits, "--out", target), f"cannot write {target}",
             f"{blocker} is a file", "choose another --out")  # fmt: skip
    assert leftovers(tmp_path) == []


def test_explain_to_a_folder_that_cannot_be_made(run_cli, finished, blocker, tmp_path):
    one_line(run_cli("explain", finished, "--index", "0", "--out", blocker / "figures"),
             f"cannot write {blocker / 'figures'}", f"{blocker} is a file",
             "choose another --out")  # fmt: skip
    assert leftovers(tmp_path, finished) == []


def test_export_to_a_place_that_cannot_be_written(run_cli, finished, blocker, tmp_path):
    pytest.importorskip("onnx", reason="export needs the export extra")
    one_line(run_cli("export", finished, "--out", blocker / "model.onnx"),
             f"{blocker} is a file, not a folder", "choose another --out")  # fmt: skip
    one_line(run_cli("export", finished, "--out", tmp_path), f"cannot write {tmp_path} (it is a "
             "folder: give a file name)", "choose another --out")  # fmt: skip
    assert leftovers(tmp_path, finished) == []


def test_train_into_a_folder_that_cannot_be_made(run_cli, digits, blocker, tmp_path):
    one_line(run_cli("train", "--dataset", digits, "--threads", "1", "--out", blocker / "run"),
             str(blocker / "run"), "choose another --out")  # fmt: skip
    assert leftovers(tmp_path) == []


# --- damaged run directories ------------------------------------------------------------------


def _drop_dataset(config: Path) -> None:
    values = json.loads(config.read_text())
    del values["dataset"]
    config.write_text(json.dumps(values))


def _fifty_megabytes(config: Path) -> None:
    with open(config, "r+b") as f:
        f.truncate(50 * 1024 * 1024)


@pytest.mark.parametrize(
    ("damage", "message"),
    [(_drop_dataset, "config.json lacks dataset"),
     (lambda c: c.write_text("{not json"), "config.json: unreadable (JSONDecodeError)"),
     (lambda c: c.write_text("[1, 2, 3]"), "config.json: not a JSON object"),
     (lambda c: c.write_text("[" * 100_000), "config.json: unreadable (RecursionError)"),
     (lambda c: c.write_bytes(b"\xff\xfe{}"), "config.json: unreadable (UnicodeDecodeError)"),
     (_fifty_megabytes, "config.json: larger than 1048576 bytes")],
    ids=["lacks-dataset", "not-json", "a-list", "deeply-nested", "not-utf8", "50MB"],
)  # fmt: skip
def test_a_damaged_config_is_refused(run_cli, run_copy, damage, message):
    damage(run_copy / CONFIG)
    before = sorted(p.name for p in run_copy.iterdir())
    # Every reader opens a run through `Run`: one reader per case keeps the battery short.
    command = ["evaluate", run_copy] if len(message) % 2 else ["predict", run_copy, "--index", "0"]
    one_line(run_cli(*command), message, "train the run again")
    assert sorted(p.name for p in run_copy.iterdir()) == before  # nothing written


def test_truncated_weights_are_refused(run_cli_each, run_copy):
    weights = run_copy / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    for result in run_cli_each([["predict", run_copy, "--index", "0", "--json"],
                                ["export", run_copy, "--out", run_copy / "m.onnx"]]):  # fmt: skip
        one_line(result, f"{weights}: unreadable weights", "train the run again")
    assert not (run_copy / "m.onnx").exists() and leftovers(run_copy) == []


def test_nan_weights_never_reach_json(run_cli_each, run_copy):
    from safetensors.torch import load_file, save_file

    weights = run_copy / WEIGHTS
    state = load_file(weights)
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in state.items()}  # fmt: skip
    save_file(state, weights)
    before = sorted(p.name for p in run_copy.iterdir())
    message = f"the weights in {weights} give non-finite outputs (NaN or infinity)"
    for result in run_cli_each([["predict", run_copy, "--index", "0", "--json"],
                                ["evaluate", run_copy], ["explain", run_copy, "--index", "0"],
                                ["export", run_copy]]):  # fmt: skip
        one_line(result, message, "train the run again")
    assert sorted(p.name for p in run_copy.iterdir()) == before  # no report, figure or model


def test_a_tampered_checkpoint_is_refused_without_library_warnings(run_cli, run_copy, tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (run_copy / SUMMARY).unlink()  # as if interrupted: resume reads the checkpoint
    (run_copy / CHECKPOINT).write_bytes(pickle.dumps({"format": 2, "state": Payload()}))
    before = (run_copy / WEIGHTS).read_bytes()
    one_line(run_cli("train", "--resume", run_copy), f"{run_copy / CHECKPOINT}: refused")
    assert not (tmp_path / "pwned").exists()
    assert (run_copy / WEIGHTS).read_bytes() == before


def test_resume_of_a_finished_run_is_refused(run_cli, finished):
    before = {p.name: p.stat().st_mtime_ns for p in finished.iterdir()}
    one_line(run_cli("train", "--resume", finished), "already finished")
    assert {p.name: p.stat().st_mtime_ns for p in finished.iterdir()} == before


@pytest.mark.parametrize("command", ["evaluate", "train --resume"])
def test_a_folder_that_is_not_a_run_is_refused(run_cli, tmp_path, command):
    folder = tmp_path / "photos"
    folder.mkdir()
    one_line(run_cli(*command.split(), folder), f"{folder / CONFIG} not found",
             f"is {folder} a run directory?")  # fmt: skip
    assert list(folder.iterdir()) == []
