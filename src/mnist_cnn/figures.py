"""PNG figures, each titled and labelled so it stands alone. Matplotlib, Agg backend."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from mnist_cnn.io import atomic_path
from mnist_cnn.paths import cannot_write


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save `fig` as PNG atomically, close it, return the path; a place that cannot be
    written is the user's to fix (one clear error)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    except OSError as exc:
        raise cannot_write(path, exc) from None
    finally:
        plt.close(fig)
    return path


def image_grid(
    images: torch.Tensor,
    captions: Sequence[str],
    title: str,
    path: str | os.PathLike,
    caption_colors: Sequence[str] | None = None,
) -> Path:
    """A grid of 28x28 grayscale images, each captioned, under one title."""
    n = len(images)
    cols = min(n, 8) if n else 1
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.45 * cols, 1.6 * rows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        ax.imshow(np.asarray(images[i]), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        color = caption_colors[i] if caption_colors else "black"
        ax.set_title(captions[i], fontsize=8, color=color)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def sample_grid(images, labels, classes, title: str, path) -> Path:
    """A grid of data-set samples captioned with their class names."""
    captions = [f"{int(y)}: {classes[int(y)]}" if classes[int(y)] != str(int(y)) else str(int(y))
                for y in labels]  # fmt: skip
    return image_grid(images, captions, title, path)


def notebook_accuracy(dataset: str) -> float | None:
    from mnist_cnn.data.catalog import spec_for

    spec = spec_for(dataset)
    return spec.course.accuracy if spec and spec.course else None


def training_curves(history: list[dict], dataset: str, recipe: str, path) -> Path:
    """Train/test loss and test accuracy against epochs and against training seconds."""
    epochs = [r["epoch"] for r in history]
    seconds = [r["seconds"] for r in history]
    acc = [r["test_accuracy"] for r in history]
    trained = [r for r in history if r.get("train_loss") is not None]
    fig, (ax_loss, ax_acc, ax_time) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_loss.plot([r["epoch"] for r in trained], [r["train_loss"] for r in trained],
                 "o-", label="train loss (mean since last evaluation)")  # fmt: skip
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "s-", label="test loss")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss", yscale="log")
    ax_loss.legend()
    reference = notebook_accuracy(dataset)
    # Leave out the untrained point so the interesting range is visible.
    shown = [i for i, r in enumerate(history) if r["epoch"] > 0] or list(range(len(history)))
    for ax, xs, label in ((ax_acc, epochs, "epoch"), (ax_time, seconds, "training seconds")):
        ax.plot([xs[i] for i in shown], [acc[i] for i in shown], "o-", color="C2",
                label="test accuracy")  # fmt: skip
        if reference is not None:
            ax.axhline(reference, color="gray", ls="--", label=f"notebook (Flux): {reference}")
        ax.set(xlabel=label, ylabel="test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    ax_acc.set_title(f"Test accuracy by epoch (final {acc[-1]:.4f})")
    ax_time.set_title("Test accuracy by training time")
    fig.suptitle(f"{Path(dataset).name}, recipe '{recipe}'")
    fig.tight_layout()
    return save_figure(fig, path)


def confusion_matrix(confusion, classes, title: str, path) -> Path:
    """Rows normalised to the true class (recall), each cell also showing its count."""
    cm = np.asarray(confusion, dtype=np.int64)
    k = len(classes)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    size = max(6.0, 0.75 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    shown = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if cm[i, j] == 0:
                continue
            color = "white" if norm[i, j] > 0.5 else "black"
            text = f"{norm[i, j]:.2f}\n{cm[i, j]}" if k <= 12 else f"{cm[i, j]}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(shown, ax=ax, label="fraction of the true class (row)")
    fig.tight_layout()
    return save_figure(fig, path)


def mistakes_grid(images, labels, predictions, confidences, classes, title: str, path) -> Path:
    """Misclassified images, each captioned true / predicted / probability."""
    captions = [
        f"true {classes[int(t)]}\npred {classes[int(p)]} ({float(c):.2f})"
        for t, p, c in zip(labels, predictions, confidences, strict=True)
    ]
    return image_grid(images, captions, title, path, caption_colors=["firebrick"] * len(captions))


def conv_filters(weight: torch.Tensor, title: str, path) -> Path:
    """The first convolution's filters [C,1,k,k], each on its own symmetric colour scale."""
    w = weight.detach().float().cpu()[:, 0]
    n = len(w)
    cols = min(8, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.6 * rows + 0.9), squeeze=False)
    limit = float(w.abs().max()) or 1.0
    shown = None
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            shown = ax.imshow(w[i].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(f"filter {i}", fontsize=8)
    fig.suptitle(title, fontsize=11)
    if shown is not None:
        fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.8, label="weight (red +, blue -)")
    return save_figure(fig, path)


def feature_maps(image, stages: list[tuple[str, torch.Tensor]], title: str, path) -> Path:
    """The input image, then each stage's channels (rows), as the network computes them."""
    max_channels = max(len(maps) for _, maps in stages)
    cols = min(16, max_channels)
    rows = 1 + sum(math.ceil(min(len(maps), 32) / cols) for _, maps in stages)
    fig = plt.figure(figsize=(0.95 * cols + 1.5, 1.05 * rows + 0.8))
    grid = fig.add_gridspec(rows, cols + 1)
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=255)
    ax.set_title("input 28x28", fontsize=8)
    ax.set_axis_off()
    row = 1
    for name, maps in stages:
        maps = maps[:32]
        for i in range(len(maps)):
            r, c = row + i // cols, 1 + i % cols
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(maps[i].numpy(), cmap="magma", interpolation="nearest")
            ax.set_axis_off()
        label = fig.add_subplot(grid[row, 0])
        label.set_axis_off()
        h, w = maps.shape[-2:]
        label.text(0.95, 0.5, f"{name}\n{len(maps)} x {h}x{w}", ha="right", va="center",
                   fontsize=8)  # fmt: skip
        row += math.ceil(len(maps) / cols)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def prediction_plot(image, probabilities, classes, title: str, path) -> Path:
    """The 28x28 image as the model saw it, beside a bar chart of class probabilities."""
    probs = np.asarray(probabilities, dtype=float)
    best = int(probs.argmax())
    fig, (ax_img, ax_bar) = plt.subplots(
        1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [1, 1.8]}
    )
    ax_img.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=255)
    ax_img.set_title("what the model saw (28x28)", fontsize=9)
    ax_img.set_axis_off()
    colors = ["C1" if i == best else "C0" for i in range(len(probs))]
    ax_bar.barh(range(len(probs)), probs, color=colors)
    ax_bar.set_yticks(range(len(probs)), classes)
    ax_bar.invert_yaxis()
    ax_bar.set_xlim(0, 1)
    ax_bar.set_xlabel("probability")
    ax_bar.set_title(f"prediction: {classes[best]} ({probs[best]:.3f})", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)
