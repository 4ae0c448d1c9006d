"""PNG figures, each titled and labelled so it stands alone. Matplotlib, Agg backend."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save `fig` as PNG through a temp file + rename, close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
