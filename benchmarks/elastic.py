"""What fault tolerance costs: one checkpoint, one killed worker, and 1 against 2 processes.

    python benchmarks/elastic.py [--reps 5] [--train-limit 6400]

- Checkpoint: seconds to write one (checkpoint.pt and model.safetensors, fsynced), seed
  network, median of `--reps` x 10 writes.
- Kill: a 2-process `torchrun --max-restarts=3 ... --resume-if-exists --checkpoint-every 1`
  job; one worker is killed with SIGKILL mid-run; the time lost is from the kill to the
  first checkpoint written after the restart (so: the restart, loading, and one step).
- 1 against 2 processes: seconds per epoch of the seed recipe on `--train-limit` images,
  one process with every core against two processes with half of them each.

Prints a Markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mnist_cnn import build_model, load_dataset
from mnist_cnn.checkpoint import Checkpoint, TrainState
from mnist_cnn.data.catalog import FILE_NAMES
from mnist_cnn.data.idx import write_idx
from mnist_cnn.device import available_cores
from mnist_cnn.run import RunWriter

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def checkpoint_seconds(folder: Path, reps: int) -> float:
    model = build_model("seed")
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.rand(8, 1, 28, 28)).sum().backward()
    optimizer.step()
    writer = RunWriter.create(folder / "ckpt")
    times = []
    for _ in range(reps * 10):
        state = TrainState(step=1, history=[{"step": 0}] * 50)
        checkpoint = Checkpoint({}, state, model.state_dict(), optimizer.state_dict())
        start = time.perf_counter()
        writer.save_checkpoint(checkpoint, model)
        times.append(time.perf_counter() - start)
    writer.close()
    return statistics.median(times)


def digits_folder(folder: Path, n: int) -> Path:
    mnist = load_dataset("mnist")
    out = folder / "digits"
    out.mkdir(exist_ok=True)
    arrays = [mnist.train.images[:n].numpy(), mnist.train.labels[:n].numpy().astype(np.uint8),
              mnist.test.images.numpy(), mnist.test.labels.numpy().astype(np.uint8)]  # fmt: skip
    for name, array in zip(FILE_NAMES, arrays, strict=True):
        write_idx(out / name, array)
    return out


def train_command(out: str, epochs: str, threads: int, every: str = "epoch") -> list[str]:
    return ["-m", "mnist_cnn", "train", "--dataset", "digits", "--epochs", epochs,
            "--eval-every", "0", "--threads", str(threads), "--checkpoint-every", every,
            "--resume-if-exists", "--out", out]  # fmt: skip


def seconds_per_epoch(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = [r["seconds"] for r in rows if r["step"] > 0]
    return statistics.median(b - a for a, b in zip([0.0, *ends], ends, strict=False))


def one_against_two(folder: Path, reps: int) -> tuple[float, float]:
    cores = available_cores()
    one, two = [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for rep in range(reps):
        a, b = f"one-{rep}", f"two-{rep}"
        subprocess.run([sys.executable, *train_command(a, "2", cores)], cwd=folder, env=env,
                       check=True, capture_output=True)  # fmt: skip
        subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2",
                        *train_command(b, "2", max(1, cores // 2))], cwd=folder, env=env,
                       check=True, capture_output=True)  # fmt: skip
        one.append(seconds_per_epoch(folder / a))
        two.append(seconds_per_epoch(folder / b))
    return statistics.median(one), statistics.median(two)


def seconds_lost_per_kill(folder: Path, reps: int) -> list[float]:
    lost = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for rep in range(reps):
        out = folder / f"killed-{rep}"
        job = subprocess.Popen(
            [TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=3",
             *train_command(out.name, "3", 1, every="1")],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        checkpoint = out / "checkpoint.pt"
        while not checkpoint.exists():
            time.sleep(0.01)
        time.sleep(1.0)
        victim = next(p for p in Path("/proc").iterdir()
                      if p.name.isdigit() and _parent(p) == job.pid)  # fmt: skip
        before = checkpoint.stat().st_mtime_ns
        os.kill(int(victim.name), signal.SIGKILL)
        killed_at = time.time()
        while True:  # the first checkpoint written by the restarted group
            mtime = checkpoint.stat().st_mtime_ns
            if mtime > before and mtime / 1e9 > killed_at:
                lost.append(mtime / 1e9 - killed_at)
                break
            time.sleep(0.01)
        job.wait(timeout=600)
    return lost


def _parent(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().split()[3])
    except (OSError, ValueError, IndexError):
        return -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--train-limit", type=int, default=6400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = checkpoint_seconds(folder, args.reps)
        digits_folder(folder, args.train_limit)
        lost = seconds_lost_per_kill(folder, args.reps)
        one, two = one_against_two(folder, args.reps)
    print(f"## Fault tolerance, {time.strftime('%Y-%m-%d')} (benchmarks/elastic.py)\n")
    print(f"- Command: `python benchmarks/elastic.py --reps {args.reps} "
          f"--train-limit {args.train_limit}`")  # fmt: skip
    print(f"- Machine: {platform.processor() or platform.machine()}, {available_cores()} cores, "
          f"torch {torch.__version__}\n")  # fmt: skip
    print("| measure | median | runs |")
    print("|---|---|---|")
    print(f"| one checkpoint (seed network, fsynced) | {ckpt * 1000:.1f} ms | {args.reps * 10} |")
    print(f"| time lost per killed worker (kill to first step after restart) | "
          f"{statistics.median(lost):.1f} s | {', '.join(f'{x:.1f}' for x in lost)} |")  # fmt: skip
    print(f"| seconds per epoch, 1 process ({available_cores()} threads) | {one:.2f} s | "
          f"{args.reps} |")  # fmt: skip
    print(f"| seconds per epoch, 2 processes (torchrun) | {two:.2f} s | {args.reps} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
