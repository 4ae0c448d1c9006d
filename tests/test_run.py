"""The parts `fit` is built from, tested without training a network; and the run directory:
one writer under a lock, --overwrite, checkpoints that must belong to their run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_cnn import build_model, fit, load_dataset
from mnist_cnn.checkpoint import Checkpoint, TrainState, load_checkpoint, save_checkpoint
from mnist_cnn.data import Dataset, Split
from mnist_cnn.data.batches import Augmentation, BatchSource
from mnist_cnn.distributed import World
from mnist_cnn.errors import TrainingInterrupted, UserError
from mnist_cnn.io import TEMP_SUFFIX, atomic_path, clear_leftovers, write_atomic
from mnist_cnn.metrics import uses_channels_last
from mnist_cnn.run import LOCK, RUN_FILES, Run, RunWriter, default_run_dir, load_model
from mnist_cnn.train import evaluation_due, resume_run


def tiny_split(n: int = 300, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    return Split(images, torch.arange(n) % 10)


def source(split: Split, **kwargs) -> BatchSource:
    options = {"batch_size": 32, "epochs": 2.5, "seed": 3, "device": torch.device("cpu")}
    return BatchSource(split, **{**options, **kwargs})


# --- the batch source -------------------------------------------------------------------------


@pytest.mark.parametrize("augmentation", [Augmentation(), Augmentation(2, True, 10, 0.1)])
def test_a_batch_source_started_at_step_k_yields_what_the_whole_run_yields_from_k(augmentation):
    whole = list(source(tiny_split(), augmentation=augmentation).from_step(0))
    assert len(whole) == 25  # 10 batches an epoch (the last one short), 2.5 epochs
    assert [b.end_of_epoch for b in whole].count(True) == 3
    for k in (0, 7, 9, 10, 24):
        resumed = list(source(tiny_split(), augmentation=augmentation).from_step(k))
        assert [b.step for b in resumed] == list(range(k, 25))
        for a, b in zip(whole[k:], resumed, strict=True):
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
            assert (a.epoch, a.end_of_epoch, a.images) == (b.epoch, b.end_of_epoch, b.images)


def test_each_epoch_is_a_new_permutation_of_every_image():
    split = tiny_split()
    batches = list(source(split, augmentation=Augmentation()).from_step(0))
    for epoch in (0, 1):
        labels = torch.cat([b.y for b in batches if b.epoch == epoch])
        assert sorted(labels.tolist()) == sorted(split.labels.tolist())
    first, second = batches[0].y, batches[10].y
    assert not torch.equal(first, second)


def test_ddp_shards_are_disjoint_and_cover_each_global_batch():
    split = Split(
        torch.arange(300, dtype=torch.uint8).view(300, 1, 1).expand(300, 28, 28).clone(),
        torch.arange(300),
    )  # fmt: skip  (label = image index)
    one = list(source(split).from_step(0))
    for size in (2, 3):
        ranks = [list(source(split, world=World(r, size)).from_step(0)) for r in range(size)]
        for step, whole in enumerate(one):
            parts = [ranks[r][step] for r in range(size)]
            joined = torch.cat([p.y for p in parts])
            assert len(joined) == len(whole.y) == sum(len(p.x) for p in parts)
            assert torch.equal(joined.sort().values, whole.y.sort().values)
            assert all(p.images == whole.images for p in parts)


def test_batches_come_in_the_requested_layout():
    (batch,) = source(tiny_split(64), epochs=0.5, channels_last=True).from_step(0)
    assert batch.x.shape == (32, 1, 28, 28) and batch.x.dtype == torch.float32
    assert batch.x.is_contiguous(memory_format=torch.channels_last)
    assert batch.x.min() >= 0 and batch.x.max() <= 1


# --- the training state and its checkpoint ----------------------------------------------------


IDENTITY = {"dataset": "mnist", "classes": list("0123456789"), "recipe": {"name": "seed"},
            "seed": 0}  # fmt: skip


def a_checkpoint() -> Checkpoint:
    model = build_model("seed")
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    state = TrainState(step=17, train_seconds=3.25, last_eval_at=2.5, loss_sum=1.5, loss_count=3,
                       history=[{"step": 0, "test_accuracy": 0.1}])  # fmt: skip
    return Checkpoint(IDENTITY, state, model.state_dict(), optimizer.state_dict())


def test_the_training_state_round_trips_through_a_checkpoint(tmp_path):
    saved = a_checkpoint()
    save_checkpoint(tmp_path / "checkpoint.pt", saved)
    loaded = load_checkpoint(tmp_path / "checkpoint.pt", IDENTITY)
    assert loaded.state == saved.state and loaded.identity == IDENTITY
    assert all(torch.equal(saved.model[k], loaded.model[k]) for k in saved.model)
    assert loaded.optimizer["state"][0]["step"] == saved.optimizer["state"][0]["step"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize(
    ("change", "named"),
    [({"seed": 1}, "seed is 1 there, 0 in config.json"),
     ({"dataset": "fashion-mnist"}, "dataset"),
     ({"recipe": {"name": "fast"}}, "recipe.name"),
     ({"classes": list("0123")}, "classes")],
)  # fmt: skip
def test_a_checkpoint_of_another_run_is_refused_naming_the_difference(tmp_path, change, named):
    checkpoint = a_checkpoint()
    checkpoint.identity = {**IDENTITY, **change}
    save_checkpoint(tmp_path / "checkpoint.pt", checkpoint)
    with pytest.raises(UserError, match="belongs to another run") as refused:
        load_checkpoint(tmp_path / "checkpoint.pt", IDENTITY)
    assert named in str(refused.value)


def test_a_checkpoint_missing_a_key_is_refused(tmp_path):
    payload = {"format": 2, "identity": IDENTITY, "state": {"step": 3}, "model": {},
               "optimizer": {}}  # fmt: skip
    torch.save(payload, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match="training state lacks train_seconds"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    del payload["optimizer"]
    torch.save(payload, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match="lacks optimizer"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_evaluation_is_throttled_on_the_clock_it_is_given():
    assert not evaluation_due(60, now=59.9, last=0)
    assert evaluation_due(60, now=60, last=0)
    assert not evaluation_due(60, now=100, last=60)
    assert not evaluation_due(0, now=1e9, last=0)  # 0: only at the ends of epochs
    assert evaluation_due(1e-9, now=1e-9, last=0)


# --- atomic writes ----------------------------------------------------------------------------


def test_an_atomic_write_cut_short_leaves_the_old_file_and_a_temp_file_resume_clears(tmp_path):
    target = tmp_path / "metrics.json"
    write_atomic(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    leftover = tmp_path / f".figure.png.x{TEMP_SUFFIX}"  # what a SIGKILL mid-write leaves
    leftover.write_bytes(b"half")
    (tmp_path / ".checkpoint.pt.abc.tmp").write_bytes(b"half")  # older versions' temp names
    assert sorted(p.name for p in clear_leftovers(tmp_path)) == sorted(
        [leftover.name, ".checkpoint.pt.abc.tmp"]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# --- the run directory ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(real_digits) -> Dataset:
    """640 real training digits and 200 test digits, as a folder (so a resume finds it)."""
    return load_dataset(real_digits(640, 200))


def train(ds: Dataset, out: Path, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    options = {"epochs": 1, "eval_every": 0, "progress": False, "log": None, **kwargs}
    return fit(build_model("seed"), ds, "seed", seed=seed, out=out, **options)


def test_interrupted_by_a_signal_from_a_step_hook_then_resumed_bit_identically(digits, tmp_path):
    whole = train(digits, tmp_path / "whole", epochs=2)

    def interrupt(state: TrainState) -> None:
        if state.step == 7:
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as stopped:
        train(digits, tmp_path / "run", epochs=2, on_step=interrupt)
    assert stopped.value.step == 7
    assert Run(tmp_path / "run").checkpoint().state.step == 7
    resumed = resume_run(tmp_path / "run", log=None, progress=False)
    expected, got = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in whole.history]


def test_every_reader_gets_the_model_in_the_layout_training_used(digits, tmp_path):
    result = train(digits, tmp_path / "run")
    model = load_model(tmp_path / "run")
    assert uses_channels_last(model) and not model.training
    run = Run(tmp_path / "run")
    assert run.classes == digits.classes and run.image_style == "digit"
    x = torch.rand(3, 1, 28, 28)
    with torch.inference_mode():
        assert torch.allclose(model(x), result.model.eval()(x), atol=1e-6)


def test_a_checkpoint_copied_from_another_seed_is_refused(run_cli, digits, tmp_path):
    train(digits, tmp_path / "seed0", seed=0, epochs=2)
    train(digits, tmp_path / "seed1", seed=1, epochs=2)
    os.remove(tmp_path / "seed0" / "summary.json")  # as if seed 0 had been interrupted
    shutil.copy(tmp_path / "seed1" / "checkpoint.pt", tmp_path / "seed0" / "checkpoint.pt")
    code, _, err = run_cli("train", "--resume", tmp_path / "seed0")
    assert code == 2, err
    assert err.count("\n") == 1 and "belongs to another run (seed is 1 there, 0 in" in err


def test_overwrite_removes_every_file_the_project_wrote_and_nothing_else(digits, tmp_path):
    out = tmp_path / "run"
    train(digits, out)
    for name in RUN_FILES:  # also what evaluate, explain and export add
        if not (out / name).exists():
            (out / name).write_bytes(b"from the previous model")
    (out / ".model.onnx.x.partial").write_bytes(b"a write cut short")
    (out / "web" / "static").mkdir(parents=True)  # an exported page
    (out / "web" / "index.html").write_text("<html>")
    (out / "notes.txt").write_text("mine")
    train(digits, out, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "metrics.jsonl", "checkpoint.pt", "model.safetensors",
                     "summary.json", "curves.png", "notes.txt", LOCK}  # fmt: skip
    assert (out / "notes.txt").read_text() == "mine"


def test_a_second_process_cannot_train_or_resume_a_locked_run(digits, tmp_path):
    out = tmp_path / "run"
    train(digits, out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR);"
         " fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True);"
         " time.sleep(60)", str(out / LOCK)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="being written by another process"):
            train(digits, out, overwrite=True)
        with pytest.raises(UserError, match="being written by another process"):
            RunWriter.resume(out)
    finally:
        holder.kill()
        holder.wait()
    RunWriter.resume(out).close()  # the lock goes with the process that held it


def test_default_run_directories_never_collide(tmp_path):
    first = default_run_dir("mnist", "seed", tmp_path)
    first.mkdir()
    second = default_run_dir("mnist", "seed", tmp_path)
    assert second != first and second.parent == tmp_path
    second.mkdir()
    assert default_run_dir("mnist", "seed", tmp_path) not in (first, second)


def test_a_run_whose_config_lacks_a_key_is_one_clear_error(run_cli_each, digits, tmp_path):
    out = tmp_path / "run"
    train(digits, out)
    config = json.loads((out / "config.json").read_text())
    del config["dataset"]
    (out / "config.json").write_text(json.dumps(config))
    commands = [["evaluate", out], ["predict", out, "--index", "0"],
                ["explain", out, "--index", "0"], ["train", "--resume", out]]  # fmt: skip
    for code, _, err in run_cli_each(commands):
        assert code == 2 and err.count("\n") == 1, err
        assert "config.json lacks dataset" in err


# --- a time budget ----------------------------------------------------------------------------


def test_epochs_within_budget_keeps_whole_epochs_that_fit_its_share():
    from mnist_cnn.recipes import BUDGET_SHARE, epochs_within_budget, resolve_recipe

    best = resolve_recipe("best", "fashion-mnist")
    assert best.budget_s == 600 and best.epochs == 22
    assert epochs_within_budget(best, 20.0) == 22  # 440 s: inside 80% of 600
    assert epochs_within_budget(best, 25.0) == int(BUDGET_SHARE * 600 // 25.0) == 19
    assert epochs_within_budget(best, 1e6) == 1  # never less than one epoch
    assert epochs_within_budget(resolve_recipe("seed"), 1e6) == 10  # no budget, no cut
    with pytest.raises(UserError, match="budget"):
        resolve_recipe("best", budget_s=float("nan"))


def test_a_budget_trains_the_epochs_that_fit_records_them_and_resumes_without_retiming(
    real_digits, digits, tmp_path, monkeypatch
):
    import mnist_cnn.train as train_module

    monkeypatch.setattr(train_module, "seconds_per_epoch_probe", lambda *a, **k: 10.0)
    run = train(digits, tmp_path / "run", epochs=5, budget_s=30)  # 24 s: 2 epochs fit
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["recipe"]["epochs"] == 2 and config["recipe"]["budget_s"] == 30
    assert config["budget"]["epochs_asked"] == 5 and config["budget"]["epochs"] == 2
    assert run.summary["epochs"] == 2 and [r["epoch"] for r in run.history][-1] == 2
    plain = train(digits, tmp_path / "plain", epochs=2)  # the same arithmetic, no budget
    expected, got = plain.model.state_dict(), run.model.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    # Interrupted, then continued by the same command: the recorded count, no new timing.
    def interrupt(state: TrainState) -> None:
        if state.step == 7:
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        train(digits, tmp_path / "again", epochs=5, budget_s=30, on_step=interrupt)

    def no_probe(*args, **kwargs):
        raise AssertionError("a resumed run timed its steps again")

    monkeypatch.setattr(train_module, "seconds_per_epoch_probe", no_probe)
    from mnist_cnn.train import train_new

    resumed = train_new(str(real_digits(640, 200)), "seed", out=tmp_path / "again", log=None,
                        resume_if_exists=True, epochs=5, budget_s=30, eval_every=0,
                        progress=False)  # fmt: skip
    got = resumed.model.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_the_probe_leaves_the_model_and_every_random_generator_as_they_were(digits):
    from mnist_cnn.recipes import resolve_recipe
    from mnist_cnn.train import seconds_per_epoch_probe, training_batches

    torch.manual_seed(0)
    model = build_model("seed").to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = resolve_recipe("seed", augment_shift=2)
    batches = training_batches(digits, recipe, 0, torch.device("cpu"), World())
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    seconds = seconds_per_epoch_probe(model, recipe, batches, "fp32", torch.device("cpu"))
    assert 0 < seconds < 60
    assert torch.equal(torch.rand(4), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
