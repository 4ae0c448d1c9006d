"""Training that survives interruption, kills, bad checkpoints and divergence; torchrun."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mnist_cnn import build_model, fit, load_dataset
from mnist_cnn.checkpoint import load_checkpoint
from mnist_cnn.data.catalog import FILE_NAMES
from mnist_cnn.data.idx import write_idx
from mnist_cnn.distributed import World, shard
from mnist_cnn.errors import UserError
from mnist_cnn.io import TEMP_SUFFIX
from mnist_cnn.run import LOCK, RUN_FILES
from mnist_cnn.train import TrainingInterrupted, epoch_permutation, resume_run


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """A small MNIST-format folder of real digits (so training makes real progress)."""
    mnist = load_dataset("mnist")
    folder = tmp_path_factory.mktemp("digits")
    arrays = [
        mnist.train.images[:2560].numpy(),
        mnist.train.labels[:2560].numpy().astype(np.uint8),
        mnist.test.images[:300].numpy(),
        mnist.test.labels[:300].numpy().astype(np.uint8),
    ]
    for name, array in zip(FILE_NAMES, arrays, strict=True):
        write_idx(folder / name, array)
    return folder


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train(folder: Path, out: Path, log=None, **overrides):
    torch.manual_seed(0)
    ds = load_dataset(str(folder))
    return fit(build_model("seed"), ds, "seed", seed=0, out=out, log=log, progress=False,
               **{"epochs": 2, **overrides})  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(digits_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "whole"
    train(digits_folder, out)
    return out


@pytest.mark.parametrize("stop_after_evaluations", [4, 21, 31])
def test_interrupted_then_resumed_run_is_bit_identical(
    digits_folder, uninterrupted, tmp_path, stop_after_evaluations
):
    """Interrupt mid-epoch, at the epoch boundary and in epoch 2; resume; compare bits.

    The k-th log line (the untrained evaluation, then one per step) raises SIGINT, so
    training stops after step k - 1.
    """
    calls = []

    def interrupt_at_k(line: str) -> None:
        calls.append(line)
        if len(calls) == stop_after_evaluations:
            signal.raise_signal(signal.SIGINT)

    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as stopped:
        train(digits_folder, out, log=interrupt_at_k, eval_every=1e-9)  # evaluate every step
    assert stopped.value.step == stop_after_evaluations - 1
    assert load_checkpoint(out / "checkpoint.pt").state.step == stop_after_evaluations - 1
    result = resume_run(out, log=None, progress=False)
    assert same_weights(weights(out), weights(uninterrupted))
    steps = [row["step"] for row in result.history]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == steps


@pytest.mark.parametrize("cut_at_line", [8, 14])
def test_an_interrupted_fast_run_resumes_bit_for_bit(digits_folder, tmp_path, cut_at_line):
    """`fast` learns with MuonAdam: its momentum buffers travel in the checkpoint too. Its
    first convolution stops learning at step 10 of 20: a run cut before that stops it there
    as the uninterrupted run does, one cut after it resumes with it stopped."""

    def train_fast(out: Path, log=None):
        torch.manual_seed(0)
        return fit(build_model("fast"), load_dataset(str(digits_folder)), "fast", seed=0,
                   out=out, log=log, progress=False, epochs=1, eval_every=1e-9,
                   freeze_first_at=0.5)  # fmt: skip

    train_fast(tmp_path / "whole")
    lines = []

    def interrupt(line: str) -> None:
        lines.append(line)
        if len(lines) == cut_at_line:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train_fast(tmp_path / "cut", log=interrupt)
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert cut.optimizer["state"] and (cut.state.step < 10) == (cut_at_line < 10)
    resume_run(tmp_path / "cut", log=None, progress=False)
    assert same_weights(weights(tmp_path / "cut"), weights(tmp_path / "whole"))


def test_resuming_a_finished_run_is_refused(uninterrupted):
    with pytest.raises(UserError, match="already finished"):
        resume_run(uninterrupted, log=None)


def _spawn_train(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_cnn", "train", *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_sigkill_mid_run_leaves_a_loadable_checkpoint_and_resume_completes(digits_folder, tmp_path):
    args = ["--dataset", str(digits_folder), "--epochs", "4", "--eval-every", "0"]
    subprocess.run([sys.executable, "-m", "mnist_cnn", "train", *args, "--out", "whole"],
                   cwd=tmp_path, check=True, capture_output=True)  # fmt: skip
    rng = np.random.default_rng()
    process = _spawn_train([*args, "--out", "killed"], tmp_path)
    _wait_for(tmp_path / "killed" / "checkpoint.pt", process)
    time.sleep(rng.uniform(0, 0.5))  # somewhere in epoch 2 or later
    process.send_signal(signal.SIGKILL)
    process.communicate()
    checkpoint = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert checkpoint.state.step % 20 == 0 and checkpoint.state.step >= 20
    # A write cut short leaves only a hidden temp file, never a run file that lies.
    for path in (tmp_path / "killed").iterdir():
        assert path.name in (*RUN_FILES, LOCK) or (
            path.name.startswith(".") and path.suffix == TEMP_SUFFIX
        )
    if not (tmp_path / "killed" / "summary.json").exists():
        done = subprocess.run(
            [sys.executable, "-m", "mnist_cnn", "train", "--resume", "killed"],
            cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert same_weights(weights(tmp_path / "killed"), weights(tmp_path / "whole"))
    assert not list((tmp_path / "killed").glob(f".*{TEMP_SUFFIX}"))  # resume cleared leftovers


def test_sigint_exits_130_with_a_checkpoint_and_says_how_to_resume(digits_folder, tmp_path):
    process = _spawn_train(
        ["--dataset", str(digits_folder), "--epochs", "50", "--out", "run"], tmp_path
    )
    _wait_for(tmp_path / "run" / "checkpoint.pt", process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "--resume run" in err and "Traceback" not in err
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert checkpoint.state.step > 0 and checkpoint.optimizer["state"]


def test_non_finite_loss_stops_naming_the_step(run_cli, digits_folder, tmp_path):
    code, _, err = run_cli(
        "train", "--dataset", str(digits_folder), "--lr", "1e6", "--epochs", "2",
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert code == 2
    assert re.search(r"diverged at step \d+: the loss is", err) and "--lr" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # nothing good to keep yet
    assert len(err.strip().splitlines()) == 1


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_checkpoint_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "model": _Evil(marker)}, path)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_corrupt_and_truncated_checkpoints_give_clear_errors(uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    (run / "summary.json").unlink()
    data = (run / "checkpoint.pt").read_bytes()
    for broken in (data[: len(data) // 2], b"garbage" * 10, b""):
        (run / "checkpoint.pt").write_bytes(broken)
        with pytest.raises(UserError, match="checkpoint"):
            resume_run(run, log=None)


def test_unwritable_run_directory_is_one_clear_error(run_cli, digits_folder, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/mnist-cnn-run"  # even root cannot create folders here
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "run")
    code, _, err = run_cli("train", "--dataset", str(digits_folder), "--out", target)
    assert code == 2 and "cannot write to run directory" in err
    assert len(err.strip().splitlines()) == 1


# --- torchrun -------------------------------------------------------------------------------


def test_rank_shards_are_disjoint_and_cover_every_batch():
    order = epoch_permutation(1000, seed=3, epoch=2)
    for start in range(0, 1000, 128):
        batch = order[start : start + 128]
        parts = [shard(batch, World(rank=r, size=3)) for r in range(3)]
        joined = torch.cat(parts)
        assert len(joined) == len(batch)
        assert torch.equal(joined.sort().values, batch.sort().values)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(digits_folder, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    common = ["-m", "mnist_cnn", "train", "--dataset", str(digits_folder), "--epochs", "1",
              "--eval-every", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *common, "--out", "one"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", *common, "--out", "two"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("final test accuracy") == 1  # only rank 0 prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert {p.name for p in (tmp_path / "two").iterdir()} == {
        p.name for p in (tmp_path / "one").iterdir()
    }
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-2, rtol=0), key
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["processes"] == 2
    acc_one = json.loads((tmp_path / "one" / "summary.json").read_text())["test_accuracy"]
    acc_two = json.loads((tmp_path / "two" / "summary.json").read_text())["test_accuracy"]
    assert abs(acc_one - acc_two) <= 0.02


def test_a_full_disk_is_one_clear_error_and_keeps_the_last_checkpoint(
    digits_folder, tmp_path, monkeypatch
):
    import errno

    import mnist_cnn.checkpoint as checkpoint_module

    real_save = checkpoint_module.torch.save
    calls = []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:  # the checkpoint of epoch 2 finds the disk full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_the_disk_fills)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="No space left on device") as failed:
        train(digits_folder, out)
    assert "the last complete checkpoint is kept" in str(failed.value)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert load_checkpoint(out / "checkpoint.pt").state.step == 20  # epoch 1, intact
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK]
    result = resume_run(out, log=None, progress=False)
    assert result.history[-1]["step"] == 40
