"""fit(): the training loop, readable top to bottom, built from parts with one job each.

Batches come ready from `data.batches.BatchSource` (order, shard, augmentation, layout);
`train_step` takes one optimizer step; `TrainState` (checkpoint.py) is where training
stands; a `RunWriter` (run.py) writes the run directory, or a `NullWriter` nothing.
Evaluation runs every `eval_every` seconds of training (the notebook's
`throttle(evalcb, 60)`) and at the end of every epoch; its time is not training time.
"""

from __future__ import annotations

import copy
import math
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mnist_cnn.checkpoint import (
    CHECKPOINT,
    Checkpoint,
    TrainState,
    identity_differences,
    run_identity,
)
from mnist_cnn.data import Dataset
from mnist_cnn.data.batches import (
    Augmentation,
    Batch,
    BatchSource,
    epoch_permutation,
    total_steps,
)
from mnist_cnn.device import autocast, resolve_precision, synchronize, training_device
from mnist_cnn.distributed import World, any_rank, current_world, init_process_group, wait_for_all
from mnist_cnn.errors import TrainingInterrupted, UserError
from mnist_cnn.metrics import evaluate
from mnist_cnn.models import build_model, count_parameters
from mnist_cnn.optim import MuonAdam
from mnist_cnn.pool import kernel_status
from mnist_cnn.recipes import BUDGET_SHARE, Recipe, epochs_within_budget, resolve_recipe
from mnist_cnn.run import (
    CONFIG,
    CURVES,
    NullWriter,
    Run,
    RunWriter,
    default_run_dir,
    fastest_layout,
)

__all__ = ["TrainResult", "TrainingInterrupted", "epoch_permutation", "fit", "resume_run"]

# A cross-entropy this large means logit gaps of a million: the softmax is saturated and
# the weights have blown up (with --lr 1e6 it reaches 1e30 in one step, yet stays finite).
DIVERGED_LOSS = 1e6


@dataclass
class TrainResult:
    model: nn.Module
    recipe: Recipe
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    run_dir: Path | None = None
    already_finished: bool = False  # `resume_if_exists` found the run complete: nothing ran

    @property
    def test_accuracy(self) -> float:
        return self.summary["test_accuracy"]


def check_is_recipe_model(model: nn.Module, recipe: Recipe, ds: Dataset) -> None:
    """Refuse a model whose weights the recipe's network could not load: a run directory
    records the recipe's model by name, and `load_model` builds that one again."""
    expected = build_model(recipe.model, num_classes=ds.num_classes).state_dict()
    given = model.state_dict()
    if {k: v.shape for k, v in given.items()} != {k: v.shape for k, v in expected.items()}:
        raise UserError(
            f"the model is not the network recipe '{recipe.name}' trains on {ds.name} "
            f"('{recipe.model}'), and a run directory of it could not be loaded again: pass "
            f"build_model('{recipe.model}', {ds.num_classes}), or name your network to the "
            f"recipe: fit(model, ds, '{recipe.name}', model='NAME', out=...)"
        )


def fit(
    model: nn.Module,
    /,
    ds: Dataset,
    recipe: str | Recipe = "seed",
    *,
    seed: int = 0,
    device: str = "auto",
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: Checkpoint | None = None,
    progress: bool | None = None,
    threads: int | None = None,
    log: Callable[[str], None] | None = print,
    on_step: Callable[[TrainState], None] | None = None,
    checkpoint_every: Cadence | None = None,
    **overrides,
) -> TrainResult:
    """Train `model` on `ds.train` with a recipe; evaluate on `ds.test` as it goes.

    `out`: a run directory to write (config, metrics, summary, weights, curves and a
    checkpoint after every epoch and on SIGINT/SIGTERM); None writes nothing.
    `resume`: a checkpoint of the run in `out` to continue from (see `resume_run`).
    `progress`: a progress bar per epoch (None: only on a terminal).
    `threads`: CPU threads (None: the cores this process may use, shared among the
    processes of this machine under torchrun).
    `on_step`: called with the training state after every step.
    `checkpoint_every`: a checkpoint every N steps or seconds of training, besides the one
    at the end of each epoch (see `Cadence`).
    Keyword overrides (epochs=, batch_size=, lr=, eval_every=, model=, ...) change the
    recipe (`model` is positional, so `model="NAME"` names the recipe's network).
    Under `torchrun`, trains data-parallel; only rank 0 evaluates, prints and writes.
    """
    recipe = resolve_recipe(recipe, dataset=ds.name, **overrides)
    if len(ds.train) == 0 or len(ds.test) == 0:
        raise UserError(f"{ds.name}: its training or test split is empty: nothing to train on")
    if out is not None:
        check_is_recipe_model(model, recipe, ds)
    world = current_world()
    dev = training_device(device, world, threads)
    init_process_group(world, dev)
    precision = resolve_precision(recipe.precision, dev)
    say = (log or _silent) if world.is_main else _silent
    core = fastest_layout(model.to(dev)) if recipe.channels_last else model.to(dev)
    optimizer = make_optimizer(recipe, core)
    state = TrainState()
    if resume is not None:
        core.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        state = replace(resume.state, history=list(resume.state.history))
    net = DistributedDataParallel(core) if world.distributed else core
    batches = training_batches(ds, recipe, seed, dev, world)
    budget = None
    if resume is None and recipe.budget_s > 0:
        recipe, budget = fit_to_budget(recipe, core, batches, precision, dev, world, say)
        batches = training_batches(ds, recipe, seed, dev, world)
    config = run_config(ds, recipe, seed, dev, precision, world, core)
    if budget is not None:
        config["budget"] = budget
    writer = open_writer(out, overwrite, resume is not None, world, config, state)
    cadence, last_checkpoint = checkpoint_every or Cadence(), state.train_seconds

    def save_checkpoint() -> None:
        nonlocal last_checkpoint
        last_checkpoint = state.train_seconds
        saved = replace(state, loss_sum=float(state.loss_sum))
        checkpoint = Checkpoint(run_identity(config), saved, core.state_dict(),
                                optimizer.state_dict())  # fmt: skip
        writer.save_checkpoint(checkpoint, core)

    def evaluate_now() -> None:
        row = evaluation_row(core, ds.test, state, batches.steps_per_epoch)
        writer.append_metrics(row)
        say(_eval_line(row, ds.num_classes))

    # A resumed run past that step freezes before its first step, as the first run did.
    freeze_at, frozen = max(freeze_step(recipe, len(batches)), state.step), []
    try:
        if resume is not None:
            say(f"resuming at step {state.step} of {len(batches)} "
                f"(epoch {state.step / batches.steps_per_epoch:.2f})")  # fmt: skip
        elif world.is_main:
            evaluate_now()
        net.train()
        with _StopOnSignal() as stop, _Progress(batches, recipe, progress, world) as bar:
            for batch in batches.from_step(state.step):
                tick = time.perf_counter()
                if batch.step == freeze_at:
                    frozen = freeze_first_conv(core)
                    if frozen and world.distributed:
                        net = DistributedDataParallel(core)
                lr = recipe.lr * lr_factor(recipe, batch.step, len(batches))
                loss = train_step(net, optimizer, batch, lr, recipe, precision, dev)
                state.step += 1
                state.loss_sum += loss.detach()
                state.loss_count += 1
                if batch.end_of_epoch:
                    synchronize(dev)  # queued kernels are this epoch's training time
                state.train_seconds += time.perf_counter() - tick
                bar.update(batch, loss)
                check_divergence(loss, state.step, world, dev, writer)
                due = evaluation_due(recipe.eval_every, state.train_seconds, state.last_eval_at)
                if world.is_main and (batch.end_of_epoch or due):
                    bar.clear()
                    evaluate_now()
                    net.train()
                if batch.end_of_epoch or cadence.due(
                    state.step, state.train_seconds, last_checkpoint
                ):
                    save_checkpoint()
                if on_step is not None:
                    on_step(state)
                if any_rank(stop.requested, world, dev):
                    save_checkpoint()
                    raise TrainingInterrupted(state.step, writer.path)
        core.eval()
        summary = run_summary(config, recipe, state) if world.is_main else {}
        writer.save_weights(core)
        writer.write_summary(summary)
        writer.write_curves(state.history, ds.name, recipe.name)
    finally:
        for p in frozen:  # the model goes back as it came, every layer able to learn
            p.requires_grad_(True)
        writer.close()
    # Every rank leaves together, after rank 0 has written everything: a rank that tears
    # down its process group while another still uses it can abort the whole job.
    wait_for_all(world)
    return TrainResult(core, recipe, state.history, summary, writer.path)


def resume_run(run_dir: str | Path, device: str = "auto", **kwargs) -> TrainResult:
    """Continue an interrupted run from its checkpoint, with the settings it started with."""
    run = Run(run_dir)
    checkpoint = run.checkpoint()
    ds = run.dataset
    recipe = run.recipe
    if run.summary() is not None and checkpoint.state.step >= total_steps(
        recipe.epochs, len(ds.train), recipe.batch_size
    ):
        raise UserError(f"{run.path} has already finished: nothing to resume; start another "
                        "run with --out, or train this one again with --overwrite")  # fmt: skip
    model = run.build_model()
    try:
        model.load_state_dict(checkpoint.model)
    except (RuntimeError, KeyError) as exc:
        raise UserError(
            f"{run.path / 'checkpoint.pt'} does not fit model '{run.recipe.model}' ({exc})"
        ) from None
    return fit(model, ds, run.recipe, seed=run.seed, device=device, out=run.path,
               resume=checkpoint, **kwargs)  # fmt: skip


def train_new(
    dataset: str,
    recipe: str = "seed",
    *,
    seed: int = 0,
    out: str | Path | None = None,
    resume_if_exists: bool = False,
    data_log: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = print,
    **kwargs,
) -> TrainResult:
    """What `mnist-cnn train` does: load the data set, build the recipe's model with a
    seeded initialisation, and fit it into `out` (default runs/DATASET-RECIPE-TIME).

    `resume_if_exists`: the same command continues `out` from its last checkpoint when it
    holds an unfinished run of the same settings, and does nothing when that run has
    finished (what a scheduler's restart or torchrun's `--max-restarts` needs).
    """
    from mnist_cnn.data import load_dataset
    from mnist_cnn.models import build_model

    fit_keys = {"device", "overwrite", "progress", "threads", "on_step", "checkpoint_every"}
    options = {k: v for k, v in kwargs.items() if k in fit_keys}
    overrides = {k: v for k, v in kwargs.items() if k not in fit_keys}
    resolved = resolve_recipe(recipe, dataset=str(dataset), **overrides)
    ds = load_dataset(dataset, log=data_log)
    out = Path(out) if out is not None else default_run_dir(ds.name, resolved.name)
    if resume_if_exists and (out / CONFIG).exists():
        run = same_run(out, ds, resolved, seed)
        summary = run.summary()
        if summary is not None:
            if current_world().is_main:
                tidy_finished_run(run)
            return TrainResult(run.load_model(), resolved, run.metrics(), summary, run.path,
                               already_finished=True)  # fmt: skip
        if (out / CHECKPOINT).exists():
            resume_options = {k: v for k, v in options.items() if k != "overwrite"}
            return resume_run(out, log=log, **resume_options)
        options["overwrite"] = True  # started, killed before its first checkpoint: again
    torch.manual_seed(seed)
    model = build_model(resolved.model, num_classes=ds.num_classes)
    if log is not None:
        log(f"training '{resolved.model}' on {ds.name} with recipe '{resolved.name}' -> {out}")
    return fit(model, ds, resolved, seed=seed, out=out, log=log, **options)


def tidy_finished_run(run: Run) -> None:
    """A job killed as it finished (torchrun stops every worker when one dies, even in the
    last writes) may have left a temp file, or no curves: clear the one, draw the other."""
    writer = RunWriter.resume(run.path)
    try:
        if not (run.path / CURVES).exists():
            writer.write_curves(run.metrics(), run.dataset_name, run.recipe.name)
    finally:
        writer.close()


def same_run(out: Path, ds: Dataset, recipe: Recipe, seed: int) -> Run:
    """The run in `out`, if these settings would produce it; else exit 2 naming the first
    setting that differs."""
    run = Run(out)
    budget = run.config.get("budget")
    if isinstance(budget, dict) and budget.get("epochs_asked") == recipe.epochs:
        recipe = replace(recipe, epochs=run.recipe.epochs)  # the count its budget chose
    asked = {"dataset": ds.name, "classes": list(ds.classes), "recipe": recipe.to_dict(),
             "seed": seed}  # fmt: skip
    differences = identity_differences(run.identity, asked)
    if differences:
        what, theirs, ours = differences[0]
        raise UserError(
            f"{out} holds a run with {what} {theirs!r:.60}, but this command asks for "
            f"{ours!r:.60}: repeat the run's own settings to continue it, or choose another --out"
        )
    return run


@dataclass(frozen=True)
class Cadence:
    """How often to write a checkpoint besides each epoch's end: every `steps` optimizer
    steps, or every `seconds` of training time (None: only at epoch ends)."""

    steps: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> Cadence:
        """'epoch', 'N' (steps) or 'Ns' (seconds of training)."""
        text = text.strip().lower()
        if text == "epoch":
            return cls()
        try:
            if text.endswith("s"):
                value = float(text[:-1])
                if math.isfinite(value) and value > 0:
                    return cls(seconds=value)
            elif int(text) > 0:
                return cls(steps=int(text))
        except ValueError:
            pass
        raise UserError(
            f"--checkpoint-every {text!r}: give 'epoch', a number of steps (500) or of "
            "seconds of training (300s)"
        )

    def due(self, step: int, seconds: float, last_seconds: float) -> bool:
        if self.steps is not None:
            return step % self.steps == 0
        return self.seconds is not None and seconds - last_seconds >= self.seconds


# --- the parts ---------------------------------------------------------------------------------


def training_batches(
    ds: Dataset, recipe: Recipe, seed: int, device: torch.device, world: World
) -> BatchSource:
    augmentation = Augmentation(recipe.augment_shift, recipe.augment_flip, recipe.augment_rotate,
                                recipe.augment_scale)  # fmt: skip
    return BatchSource(ds.train, batch_size=recipe.batch_size, epochs=recipe.epochs, seed=seed,
                       device=device, world=world, augmentation=augmentation,
                       channels_last=recipe.channels_last)  # fmt: skip


def make_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    if recipe.optimizer == "muon":
        return MuonAdam(model, lr=recipe.lr, weight_decay=recipe.weight_decay)
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


def train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    lr: float,
    recipe: Recipe,
    precision: str,
    device: torch.device,
) -> torch.Tensor:
    """One optimizer step on one batch; returns the batch's loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(precision, device):
        logits = net(batch.x)
    loss = F.cross_entropy(logits.float(), batch.y, label_smoothing=recipe.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def freeze_step(recipe: Recipe, steps: int) -> int:
    """The step from which the first convolution stops learning (`steps`: it never does)."""
    return math.ceil(recipe.freeze_first_at * steps)


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def freeze_first_conv(model: nn.Module) -> list[nn.Parameter]:
    """Stop the first convolution of `model` learning; returns the parameters it stopped.
    Under torchrun the model needs a new DistributedDataParallel of the parameters still
    learning (the old one would wait for these gradients).

    The layer nearest the image learns its edges and strokes first, and by half-way
    through a decaying learning rate it moves little (FreezeOut, Brock et al. 2017). Frozen,
    it needs no weight gradient, and the second convolution no gradient for its input: a
    `fast` step in float32 takes 0.78-0.84x the time on clothes, 0.90-0.94x on digits
    (benchmarks/RESULTS.md). Its optimizer state is kept, so a checkpoint resumes as before.
    """
    conv = _first_conv(model)
    stopped = [p for p in conv.parameters() if p.requires_grad] if conv is not None else []
    for p in stopped:
        p.requires_grad_(False)
        p.grad = None
    return stopped


def seconds_per_epoch_probe(
    model: nn.Module,
    recipe: Recipe,
    batches: BatchSource,
    precision: str,
    device: torch.device,
    steps: int = 20,
    warmup: int = 5,
) -> float:
    """Seconds one epoch of `batches` takes here: the median of `steps` training steps
    (batch preparation included) on a copy of the model, times the steps of an epoch.
    The model, its optimizer and every random generator are left as they were."""
    probe = copy.deepcopy(model).train()
    optimizer = make_optimizer(recipe, probe)
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        source = iter(batches.from_step(0))
        for _ in range(min(warmup + steps, len(batches))):
            tick = time.perf_counter()
            batch = next(source)
            train_step(probe, optimizer, batch, recipe.lr * 1e-3, recipe, precision, device)
            synchronize(device)
            times.append(time.perf_counter() - tick)
    measured = times[warmup:] or times
    return statistics.median(measured) * batches.steps_per_epoch


def fit_to_budget(
    recipe: Recipe,
    model: nn.Module,
    batches: BatchSource,
    precision: str,
    device: torch.device,
    world: World,
    say: Callable[[str], None],
) -> tuple[Recipe, dict]:
    """The recipe with as many of its epochs as fit its time budget on this machine, and
    what config.json records of the choice. Every rank adopts the slowest rank's figure,
    so all train the same number of steps; a resumed run keeps the count it started with."""
    seconds = seconds_per_epoch_probe(model, recipe, batches, precision, device)
    if world.distributed:
        slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        seconds = float(slowest.item())
    epochs = epochs_within_budget(recipe, seconds)
    if epochs < recipe.epochs:
        say(f"recipe '{recipe.name}': {recipe.epochs:g} epochs would take about "
            f"{recipe.epochs * seconds:.0f} s here ({seconds:.1f} s each), past "
            f"{BUDGET_SHARE:.0%} of its {recipe.budget_s:g} s budget: training {epochs:g} "
            "epochs (recorded in config.json; --budget 0 trains them all)")  # fmt: skip
    record = {"seconds": recipe.budget_s, "share": BUDGET_SHARE, "epochs_asked": recipe.epochs,
              "seconds_per_epoch_probe": round(seconds, 3), "epochs": epochs}  # fmt: skip
    return replace(recipe, epochs=epochs), record


def check_divergence(
    loss: torch.Tensor, step: int, world: World, device: torch.device, writer
) -> None:
    """Stop every rank, naming the step, once the loss is not finite or has exploded.

    On CPU a host sync costs nothing, so the loss is checked every step; on a GPU only
    every 25 steps, to keep the device busy.
    """
    checked = device.type == "cpu" or step % 25 == 0
    if not any_rank(checked and not loss.item() <= DIVERGED_LOSS, world, device):
        return
    kept = "no checkpoint was written before it"
    if writer.path is not None and (writer.path / CHECKPOINT).exists():
        kept = f"the last good checkpoint is kept in {writer.path}"
    raise UserError(
        f"training diverged at step {step}: the loss is {loss.item():.3g} (not finite or over "
        f"{DIVERGED_LOSS:.0e}); lower the learning rate (--lr); {kept}"
    )


def evaluation_due(every: float, now: float, last: float) -> bool:
    """Whether `every` seconds (0: never) have passed since `last`, on a clock reading
    `now`: the notebook's `throttle`, on the clock of training time."""
    return every > 0 and now - last >= every


def evaluation_row(model: nn.Module, test, state: TrainState, steps_per_epoch: int) -> dict:
    """Evaluate on the test split; record the row in the state (and reset the loss sum)."""
    result = evaluate(model, test)
    train_loss = None
    if state.loss_count:
        train_loss = float(state.loss_sum / state.loss_count)
    row = {
        "epoch": round(state.step / steps_per_epoch, 4),
        "step": state.step,
        "seconds": round(state.train_seconds, 3),
        "train_loss": train_loss,
        "test_loss": result.loss,
        "test_accuracy": result.accuracy,
    }
    state.history.append(row)
    state.loss_sum, state.loss_count, state.last_eval_at = 0.0, 0, state.train_seconds
    return row


def run_config(
    ds: Dataset,
    recipe: Recipe,
    seed: int,
    device: torch.device,
    precision: str,
    world: World,
    model: nn.Module,
) -> dict:
    """config.json: every setting that produced the run."""
    return {
        "dataset": ds.name,
        "classes": list(ds.classes),
        "recipe": recipe.to_dict(),
        "seed": seed,
        "device": str(device),
        "precision": precision,
        "processes": world.size,
        "threads": torch.get_num_threads(),
        "max_pooling": kernel_status() if device.type == "cpu" else "pytorch",
        "params": count_parameters(model),
        "versions": versions(),
        "command": sys.argv,
    }


def run_summary(config: dict, recipe: Recipe, state: TrainState) -> dict:
    """summary.json: what the run reached, in how much training time."""
    return {
        "dataset": config["dataset"],
        "recipe": recipe.name,
        "model": recipe.model,
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "seed": config["seed"],
        "device": config["device"],
        "params": config["params"],
        "processes": config["processes"],
        "train_seconds": round(state.train_seconds, 3),
        "test_accuracy": state.history[-1]["test_accuracy"],
        "test_loss": state.history[-1]["test_loss"],
        "torch_version": torch.__version__,
    }


def open_writer(
    out: str | Path | None,
    overwrite: bool,
    resuming: bool,
    world: World,
    config: dict,
    state: TrainState,
) -> RunWriter | NullWriter:
    """The run directory's writer (rank 0 with `out`), else one that writes nothing."""
    if out is None or not world.is_main:
        return NullWriter()
    if not resuming:
        writer = RunWriter.create(out, overwrite)
        writer.write_config(config)
        return writer
    writer = RunWriter.resume(out)
    writer.rewrite_metrics(state.history)  # drop rows written after the checkpoint
    return writer


def versions() -> dict:
    from mnist_cnn import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "mnist_cnn": __version__}  # fmt: skip


def _silent(_line: str) -> None:
    pass


def _eval_line(row: dict, num_classes: int) -> str:
    if row["train_loss"] is None:
        return (f"initial test accuracy {row['test_accuracy']:.4f} (untrained; chance is "
                f"{1 / num_classes:.2f})")  # fmt: skip
    return (
        f"epoch {row['epoch']:6.2f}  {row['seconds']:7.1f}s  "
        f"train loss {row['train_loss']:.4f}  test loss {row['test_loss']:.4f}  "
        f"test accuracy {row['test_accuracy']:.4f}"
    )


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


class _Progress:
    """A progress bar per epoch on stderr (by default only on a terminal, only rank 0)."""

    def __init__(self, batches: BatchSource, recipe: Recipe, show: bool | None, world: World):
        self.batches, self.recipe = batches, recipe
        self.disable = True if not world.is_main else ((not show) if show is not None else None)
        self.bar: tqdm | None = None
        self.epoch = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False

    def update(self, batch: Batch, loss: torch.Tensor) -> None:
        if batch.epoch != self.epoch:
            self.__exit__()
            self.epoch = batch.epoch
            done = batch.step - batch.epoch * self.batches.steps_per_epoch
            self.bar = tqdm(total=self.batches.n, initial=done * self.recipe.batch_size,
                            desc=f"epoch {batch.epoch + 1}/{self.recipe.epochs:g}", unit="img",
                            disable=self.disable, leave=False, file=sys.stderr)  # fmt: skip
        self.bar.update(batch.images)
        if batch.step % 50 == 49 and not self.bar.disable:
            rate = self.bar.format_dict["rate"] or 0
            self.bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}")
        if batch.end_of_epoch:
            self.__exit__()
            self.bar = None

    def clear(self) -> None:
        if self.bar is not None:
            self.bar.clear()
