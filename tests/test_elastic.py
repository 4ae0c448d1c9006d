"""Training that a scheduler may kill and restart: the same command resumes; torchrun's
`--max-restarts` survives a killed worker; two launchers make one job. Weights are
compared bit for bit with runs never interrupted (CPU, one thread per process)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, real_digits) -> Path:
    """A folder holding `digits`: 2,560 real training digits (20 steps an epoch), 300 test."""
    folder = tmp_path_factory.mktemp("elastic")
    (folder / "digits").symlink_to(real_digits(2560, 300))
    return folder


def train_args(out: str, epochs: str = "2", every: str = "2") -> list[str]:
    """`fast`, whose first convolution stops learning half-way: under torchrun that takes a
    new DistributedDataParallel, and a kill lands before or after it."""
    return ["-m", "mnist_cnn", "train", "--dataset", "digits", "--recipe", "fast",
            "--epochs", epochs, "--eval-every", "0", "--threads", "1", "--checkpoint-every",
            every, "--resume-if-exists", "--out", out]  # fmt: skip


def launcher(*options: str) -> list[str]:
    return [TORCHRUN, *options, "--max-restarts=3"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def children(parent: int) -> dict[str, int]:
    """The workers a torchrun launcher started: their RANK -> pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().split()[3]) == parent:
                for var in (entry / "environ").read_bytes().split(b"\0"):
                    if var.startswith(b"RANK="):
                        found[var[5:].decode()] = int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return found


def kill_a_worker_mid_run(launcher: subprocess.Popen, out: Path, rank: str | None) -> None:
    """Once the run has a checkpoint, at a random moment, SIGKILL the launcher's worker of
    `rank` (None: its only worker)."""
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.02)
    time.sleep(random.uniform(0, 0.8))
    workers = children(launcher.pid)
    rank = rank if rank is not None else next(iter(workers), None)
    assert rank in workers, f"no worker of rank {rank} found: {workers}"
    os.kill(workers[rank], signal.SIGKILL)


def finish(process: subprocess.Popen) -> str:
    try:
        out, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its workers
        raise
    assert process.returncode == 0, out[-3000:]
    return out


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def spawn(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # so that a failed test can stop the launcher and its workers
    )  # fmt: skip


# --- one process: the same command resumes ------------------------------------------------------


def test_the_same_command_starts_continues_and_then_leaves_a_finished_run_alone(workdir):
    whole = run([sys.executable, *train_args("whole-1")], workdir)
    assert whole.returncode == 0, whole.stderr
    killed = spawn([sys.executable, *train_args("again-1")], workdir)
    deadline = time.monotonic() + 120
    while not (workdir / "again-1" / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0, 0.5))
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    if not (workdir / "again-1" / "summary.json").exists():
        again = run([sys.executable, *train_args("again-1")], workdir)
        assert again.returncode == 0, again.stderr
        assert "resuming at step" in again.stdout
    assert same_weights(workdir / "whole-1", workdir / "again-1")

    # As torchrun leaves a job whose worker died in its last writes: a temp file, no curves.
    (workdir / "again-1" / "curves.png").unlink()
    (workdir / "again-1" / ".curves.png.x1y2.partial").write_bytes(b"half a figure")
    done = run([sys.executable, *train_args("again-1")], workdir)
    assert done.returncode == 0 and "has already finished" in done.stdout
    assert "resuming" not in done.stdout
    assert (workdir / "again-1" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((workdir / "again-1").glob(".*.partial"))

    other = run([sys.executable, *train_args("again-1", epochs="3")], workdir)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        "mnist-cnn: error: again-1 holds a run with recipe.epochs 2.0, but this command asks "
        "for 3.0: repeat the run's own settings to continue it, or choose another --out"
    ]


def test_checkpoints_every_n_steps_give_the_same_weights(workdir):
    """A checkpoint changes nothing in training: every 3 steps or every epoch, same bits."""
    a = run([sys.executable, *train_args("every-epoch", epochs="1", every="epoch")], workdir)
    b = run([sys.executable, *train_args("every-3", epochs="1", every="3")], workdir)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert same_weights(workdir / "every-epoch", workdir / "every-3")
    bad = run([sys.executable, *train_args("x", every="soon")], workdir)
    assert bad.returncode == 2 and "--checkpoint-every 'soon'" in bad.stderr


# --- torchrun ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_processes(workdir) -> Path:
    """The reference: two processes under one launcher, never interrupted."""
    done = run([*launcher("--standalone", "--nproc_per_node=2"), *train_args("two")], workdir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return workdir / "two"


@pytest.mark.slow
@pytest.mark.parametrize(("rank", "every"), [("1", "2"), ("0", "1")])
def test_torchrun_restarts_a_killed_worker_and_the_weights_are_bit_identical(
    workdir, two_processes, rank, every
):
    """Rank 1 killed anywhere; rank 0 killed with a checkpoint written every step, so that
    the kill often lands in a write."""
    out = f"killed-rank{rank}"
    job = spawn([*launcher("--standalone", "--nproc_per_node=2"), *train_args(out, every=every)],
                workdir)  # fmt: skip
    kill_a_worker_mid_run(job, workdir / out, rank)
    log = finish(job)
    assert "resuming at step" in log or (workdir / out / "summary.json").exists()
    assert same_weights(two_processes, workdir / out)
    assert not [p for p in (workdir / out).iterdir() if p.name.endswith(".partial")]


@pytest.mark.slow
def test_two_launchers_make_one_job_and_survive_a_killed_worker(workdir, two_processes):
    nodes = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=elastic-test"]  # fmt: skip
    first = spawn([*launcher(*nodes), *train_args("nodes")], workdir)
    second = spawn([*launcher(*nodes), *train_args("nodes")], workdir)
    kill_a_worker_mid_run(second, workdir / "nodes", rank=None)
    finish(first)
    finish(second)
    assert same_weights(two_processes, workdir / "nodes")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (closed again before use: fine for a test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
