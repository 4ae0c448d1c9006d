"""Data sets as in-memory uint8 tensors: `load_dataset("mnist")`, `Dataset`, `Split`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnist_cnn.data.arrays import read_arrays, resolve_folder_files
from mnist_cnn.data.catalog import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from mnist_cnn.errors import DatasetError

__all__ = ["Dataset", "Split", "load_dataset", "resolve_folder_files"]


@dataclass(frozen=True)
class Split:
    """One split: `images` uint8 [N,28,28] and `labels` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Split:
        if name not in ("train", "test"):
            raise DatasetError(f"unknown split '{name}': use train or test")
        return self.train if name == "train" else self.test


def load_dataset(name_or_dir: str | Path, log=None) -> Dataset:
    """Load a catalog data set (provisioning it if needed) or an MNIST-format folder.

    A folder must hold the four IDX files (each optionally .gz); its classes are 0..K-1,
    K being one more than the largest label (at most 256), and every class of its
    test split must occur in its training split. Empty splits are refused.
    """
    found = read_arrays(name_or_dir, log)
    return Dataset(
        name=found.name,
        train=_split(found.arrays[TRAIN_IMAGES], found.arrays[TRAIN_LABELS]),
        test=_split(found.arrays[TEST_IMAGES], found.arrays[TEST_LABELS]),
        classes=found.classes,
    )


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels.astype(np.int64)),
    )
