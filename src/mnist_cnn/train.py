"""fit(): the training loop, readable top to bottom.

The whole data set sits in memory (on the training device) as uint8; a batch is an index
slice of a seeded per-epoch permutation, turned into floats in [0,1] as one tensor op.
Evaluation runs every `eval_every` seconds of training (the notebook's
`throttle(evalcb, 60)`) and at the end of every epoch; its time is not training time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mnist_cnn import rundir
from mnist_cnn.augment import random_affine, random_flip, random_shift, step_generator
from mnist_cnn.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from mnist_cnn.cpu import cpu_flags
from mnist_cnn.data import Dataset
from mnist_cnn.distributed import (
    World,
    any_rank,
    current_world,
    init_process_group,
    shard,
    wait_for_all,
)
from mnist_cnn.errors import UserError
from mnist_cnn.metrics import evaluate, to_input
from mnist_cnn.models import count_parameters
from mnist_cnn.pool import kernel_status
from mnist_cnn.recipes import Recipe, resolve_recipe


@dataclass
class TrainResult:
    model: nn.Module
    recipe: Recipe
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    run_dir: Path | None = None

    @property
    def test_accuracy(self) -> float:
        return self.summary["test_accuracy"]


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{name}': use auto, cpu or cuda")
    return torch.device(name)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch`: a function of (seed, epoch) alone.

    Stateless, so a resumed run or another process sees the same order.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def make_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay
        )
    cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    # Fused Adam: one kernel for all parameters instead of a loop of small ops
    # (1.98 -> 1.90 s per seed epoch on 2 cores, benchmarks/step_time.py).
    return cls(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True)


def lr_factor(recipe: Recipe, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at `step` (0-based)."""
    if recipe.schedule == "constant":
        return 1.0
    warmup = max(1, round(recipe.warmup * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls and convolutions run natively on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_precision(recipe: Recipe, device: torch.device) -> str:
    """`auto` means bf16 where the hardware has it natively, else fp32."""
    if recipe.precision != "auto":
        return recipe.precision
    return "bf16" if has_fast_bf16(device) else "fp32"


def autocast_for(precision: str, device: torch.device) -> Callable | None:
    # bf16 autocast: convolutions and the dense layer in bfloat16, loss and weights in
    # float32 (2.61 -> 1.98 s per seed epoch with avx512_bf16, benchmarks/step_time.py).
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return None


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mnist_cnn": _package_version(),
    }


def _package_version() -> str:
    from mnist_cnn import __version__

    return __version__


# A cross-entropy this large means logit gaps of a million: the softmax is saturated and
# the weights have blown up (with --lr 1e6 it reaches 1e30 in one step, yet stays finite).
DIVERGED_LOSS = 1e6


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training; a checkpoint was written when there is a run dir."""

    def __init__(self, step: int, run_dir: Path | None):
        self.step, self.run_dir = step, run_dir
        where = f"; resume with `mnist-cnn train --resume {run_dir}`" if run_dir else ""
        super().__init__(f"interrupted at step {step}{where}")


class _StopOnSignal:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (a second Ctrl-C
    still interrupts at once)."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class _WritesTo:
    """Turn a failed write into the user's problem to fix: disk full, folder unwritable.

    Every file goes through temp file + rename, so what was written before is intact.
    """

    def __init__(self, run_dir: Path | None):
        self.run_dir = run_dir

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if self.run_dir is not None and isinstance(exc, OSError):
            raise UserError(
                f"cannot write to run directory {self.run_dir} ({exc.strerror or exc}): free "
                "some space or choose another --out; the last complete checkpoint is kept"
            ) from None
        return False


def recipe_from_config(config: dict) -> Recipe:
    fields = {f.name for f in dataclasses.fields(Recipe)}
    try:
        return Recipe(**{k: v for k, v in config["recipe"].items() if k in fields})
    except (KeyError, TypeError) as exc:
        raise UserError(f"config.json has no usable recipe ({exc})") from None


def fit(
    model: nn.Module,
    ds: Dataset,
    recipe: str | Recipe = "seed",
    *,
    seed: int = 0,
    device: str = "auto",
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: dict | None = None,
    progress: bool | None = None,
    threads: int | None = None,
    log: Callable[[str], None] | None = print,
    **overrides,
) -> TrainResult:
    """Train `model` on `ds.train` with a recipe; evaluate on `ds.test` as it goes.

    `out`: a run directory to write (config, metrics, summary, weights, curves and a
    checkpoint after every epoch and on SIGINT/SIGTERM); None writes nothing.
    `resume`: a loaded checkpoint to continue from (see `resume_run`).
    `progress`: a progress bar per epoch (None: only on a terminal).
    `threads`: CPU threads (None: the cores this process may use, shared among the
    processes of this machine under torchrun). Give each of two runs sharing a machine half.
    Keyword overrides (epochs=, batch_size=, lr=, eval_every=, ...) change the recipe.
    Under `torchrun`, trains data-parallel; only rank 0 evaluates, prints and writes.
    """
    recipe = resolve_recipe(recipe, dataset=ds.name, **overrides)
    dev = select_device(device)
    world = current_world()
    if world.distributed and dev.type == "cuda":
        dev = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(dev)
    if dev.type == "cpu":
        torch.set_num_threads(threads or max(1, available_cores() // _local_processes(world)))
    init_process_group(world, dev)
    main = world.is_main
    say = (log or (lambda _line: None)) if main else (lambda _line: None)
    run_dir = None
    if out is not None and main:
        run_dir = Path(out) if resume else rundir.prepare_run_dir(out, overwrite)

    core = model.to(dev)
    if recipe.channels_last:
        # Channels-last: max pooling in the default NCHW layout took a third of each step
        # (4.22 -> 2.61 s per seed epoch on 2 cores, benchmarks/step_time.py).
        core = core.to(memory_format=torch.channels_last)
    if resume is not None:
        core.load_state_dict(resume["model"])
    net = DistributedDataParallel(core) if world.distributed else core
    precision = resolve_precision(recipe, dev)
    autocast = autocast_for(precision, dev)
    optimizer = make_optimizer(recipe, core)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
    train_images = ds.train.images.to(dev)
    train_labels = ds.train.labels.to(dev)
    n = len(train_labels)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total_steps = _total_steps(recipe, n)

    config = {
        "dataset": ds.name,
        "classes": list(ds.classes),
        "recipe": recipe.to_dict(),
        "seed": seed,
        "device": str(dev),
        "precision": precision,
        "processes": world.size,
        "threads": torch.get_num_threads(),
        "max_pooling": kernel_status() if dev.type == "cpu" else "pytorch",
        "params": count_parameters(core),
        "versions": versions(),
        "command": sys.argv,
    }
    writes = _WritesTo(run_dir)
    if run_dir is not None and resume is None:
        with writes:
            rundir.write_json(run_dir / rundir.CONFIG, config)

    history: list[dict] = list(resume["history"]) if resume else []
    step = resume["step"] if resume else 0
    train_seconds = resume["train_seconds"] if resume else 0.0
    last_eval_at = resume["last_eval_at"] if resume else 0.0
    loss_sum = torch.tensor(resume["loss_sum"] if resume else 0.0, device=dev)
    loss_count = resume["loss_count"] if resume else 0

    def checkpoint() -> None:
        if run_dir is None:
            return
        state = {
            "model": core.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "train_seconds": train_seconds,
            "last_eval_at": last_eval_at,
            "loss_sum": float(loss_sum),
            "loss_count": loss_count,
            "history": history,
            "recipe": recipe.to_dict(),
            "seed": seed,
            "dataset": ds.name,
            "rng": torch.get_rng_state(),
        }
        with writes:
            save_checkpoint(run_dir / CHECKPOINT, state)
            rundir.save_weights(core, run_dir / rundir.WEIGHTS)

    def run_eval(epoch: float, train_loss: float | None) -> dict:
        result = evaluate(core, ds.test, recipe.eval_batch_size)
        row = {
            "epoch": round(epoch, 4),
            "step": step,
            "seconds": round(train_seconds, 3),
            "train_loss": train_loss,
            "test_loss": result.loss,
            "test_accuracy": result.accuracy,
        }
        history.append(row)
        if run_dir is not None:
            with writes:
                rundir.append_jsonl(run_dir / rundir.METRICS, row)
        return row

    if resume is not None:
        if run_dir is not None:  # drop rows written after the checkpoint, and any torn line
            with writes:
                rundir.write_jsonl(run_dir / rundir.METRICS, history)
        say(f"resuming at step {step} of {total_steps} (epoch {step / steps_per_epoch:.2f})")
    elif main:
        first = run_eval(0.0, None)
        say(f"initial test accuracy {first['test_accuracy']:.4f} (untrained; chance is 0.10)")

    # On CPU a host sync costs nothing, so the loss is checked every step; on a GPU only
    # every few steps, to keep the device busy.
    check_every = 1 if dev.type == "cpu" else 25
    augments = any((recipe.augment_shift, recipe.augment_flip, recipe.augment_rotate,
                    recipe.augment_scale))  # fmt: skip
    net.train()
    with _StopOnSignal() as stop:
        for epoch in range(step // steps_per_epoch, math.ceil(total_steps / steps_per_epoch)):
            order = epoch_permutation(n, seed, epoch).to(dev)
            bar = tqdm(
                total=n,
                initial=min(n, (step - epoch * steps_per_epoch) * recipe.batch_size),
                desc=f"epoch {epoch + 1}/{recipe.epochs:g}",
                unit="img",
                disable=True if not main else ((not progress) if progress is not None else None),
                leave=False,
                file=sys.stderr,
            )
            last_batch = min(steps_per_epoch, total_steps - epoch * steps_per_epoch) - 1
            for batch in range(step - epoch * steps_per_epoch, last_batch + 1):
                tick = time.perf_counter()
                start = batch * recipe.batch_size
                idx = shard(order[start : start + recipe.batch_size], world)
                batch_images = train_images[idx]
                generator = step_generator(seed, step, dev) if augments else None
                if recipe.augment_shift:
                    batch_images = random_shift(batch_images, recipe.augment_shift, generator)
                if recipe.augment_flip:
                    batch_images = random_flip(batch_images, generator)
                x = to_input(batch_images)
                if recipe.augment_rotate or recipe.augment_scale:
                    x = random_affine(x, recipe.augment_rotate, recipe.augment_scale, generator)
                if recipe.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = train_labels[idx]
                for group in optimizer.param_groups:
                    group["lr"] = recipe.lr * lr_factor(recipe, step, total_steps)
                with autocast() if autocast else contextlib.nullcontext():
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                loss_count += 1
                step += 1
                end_of_epoch = batch == last_batch  # or the end of training, mid-epoch
                if end_of_epoch and dev.type == "cuda":
                    torch.cuda.synchronize(dev)  # queued kernels are this epoch's training time
                train_seconds += time.perf_counter() - tick
                bar.update(min(recipe.batch_size, n - start))
                if step % 50 == 0 and not bar.disable:
                    rate = bar.format_dict["rate"] or 0
                    bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}")
                diverged = step % check_every == 0 and not loss.item() <= DIVERGED_LOSS
                if any_rank(diverged, world, dev):
                    bar.close()
                    raise UserError(
                        f"training diverged at step {step}: the loss is {loss.item():.3g} "
                        f"(not finite or over {DIVERGED_LOSS:.0e}); lower the learning rate "
                        "(--lr); the last good checkpoint is kept"
                    )
                due = recipe.eval_every > 0 and train_seconds - last_eval_at >= recipe.eval_every
                if main and (end_of_epoch or due):
                    train_loss = (loss_sum / max(1, loss_count)).item()
                    loss_sum.zero_()
                    loss_count = 0
                    row = run_eval(step / steps_per_epoch, train_loss)
                    last_eval_at = train_seconds
                    bar.clear()
                    say(_eval_line(row))
                    net.train()
                if main and end_of_epoch:
                    checkpoint()
                if any_rank(stop.requested, world, dev):
                    bar.close()
                    if main:
                        checkpoint()
                    raise TrainingInterrupted(step, run_dir)
            bar.close()

    core.eval()
    summary = {}
    if main:
        summary = {
            "dataset": ds.name,
            "recipe": recipe.name,
            "model": recipe.model,
            "epochs": recipe.epochs,
            "batch_size": recipe.batch_size,
            "lr": recipe.lr,
            "seed": seed,
            "device": str(dev),
            "params": config["params"],
            "processes": world.size,
            "train_seconds": round(train_seconds, 3),
            "test_accuracy": history[-1]["test_accuracy"],
            "test_loss": history[-1]["test_loss"],
            "torch_version": torch.__version__,
        }
    if run_dir is not None:
        with writes:
            rundir.save_weights(core, run_dir / rundir.WEIGHTS)
            rundir.write_json(run_dir / rundir.SUMMARY, summary)
            from mnist_cnn.figures import training_curves

            training_curves(history, ds.name, recipe.name, run_dir / rundir.CURVES)
    # Every rank leaves together, after rank 0 has written everything: a rank that tears
    # down its process group while another still uses it can abort the whole job.
    wait_for_all(world)
    return TrainResult(model=core, recipe=recipe, history=history, summary=summary, run_dir=run_dir)


def resume_run(run_dir: str | Path, device: str = "auto", **kwargs) -> TrainResult:
    """Continue an interrupted run from its checkpoint, with the settings it started with."""
    from mnist_cnn.data import load_dataset
    from mnist_cnn.models import build_model

    run_dir = Path(run_dir)
    config = rundir.read_json(run_dir / rundir.CONFIG)
    state = load_checkpoint(run_dir / CHECKPOINT)
    for partial in run_dir.glob(".*.tmp"):  # a write cut short by a kill: never renamed
        partial.unlink(missing_ok=True)
    recipe = recipe_from_config(config)
    ds = load_dataset(config["dataset"])
    if tuple(config.get("classes", ())) != ds.classes:
        raise UserError(f"{run_dir}: its classes do not match data set {ds.name}")
    model = build_model(recipe.model, num_classes=ds.num_classes)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        raise UserError(
            f"{run_dir / CHECKPOINT} does not fit model '{recipe.model}' ({exc})"
        ) from None
    if (run_dir / rundir.SUMMARY).exists() and state["step"] >= _total_steps(recipe, len(ds.train)):
        raise UserError(f"{run_dir} has already finished: nothing to resume")
    return fit(model, ds, recipe, seed=config["seed"], device=device, out=run_dir,
               resume=state, **kwargs)  # fmt: skip


def _total_steps(recipe: Recipe, n: int) -> int:
    """Steps of the whole run; `epochs` may be fractional (1.5: one and a half passes)."""
    return math.ceil(recipe.epochs * math.ceil(n / recipe.batch_size))


def _local_processes(world: World) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world.distributed else 1


def _eval_line(row: dict) -> str:
    return (
        f"epoch {row['epoch']:6.2f}  {row['seconds']:7.1f}s  "
        f"train loss {row['train_loss']:.4f}  test loss {row['test_loss']:.4f}  "
        f"test accuracy {row['test_accuracy']:.4f}"
    )
