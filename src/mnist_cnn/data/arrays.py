"""A data set's four arrays, read and checked with numpy alone (no PyTorch).

`read_arrays("mnist")` or `read_arrays(folder)` gives the IDX arrays of a catalogued data
set (provisioned into the cache if missing) or of an MNIST-format folder, with every check
`load_dataset` relies on done: integer labels in range, 28x28 uint8 images, as many labels
as images, no empty split, no test class unseen in training. `load_dataset` turns them into
tensors; the Keras benchmark uses them as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from mnist_cnn.data.catalog import (
    CATALOG,
    FILE_NAMES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    DatasetSpec,
)
from mnist_cnn.data.fetch import dataset_dir, provision, read_verified
from mnist_cnn.data.idx import parse_idx, read_idx
from mnist_cnn.errors import DatasetError

IMAGE_SIZE = 28
MAX_CLASSES = 256  # labels 0..255: a folder's classes are one more than its largest label


class DatasetArrays(NamedTuple):
    name: str
    arrays: dict[str, np.ndarray]  # by IDX file name
    classes: tuple[str, ...]
    folder: Path


def read_arrays(name_or_dir: str | Path, log=None) -> DatasetArrays:
    """The checked arrays of a catalog data set (provisioning it if needed) or of an
    MNIST-format folder.

    A folder must hold the four IDX files (each optionally .gz); its classes are 0..K-1,
    K being one more than the largest label (at most MAX_CLASSES), and every class of its
    test split must occur in its training split. Empty splits are refused.
    """
    key = str(name_or_dir)
    if key in CATALOG:
        return _load_catalog(CATALOG[key], log)
    folder = Path(key)
    if folder.is_dir():
        return _load_folder(folder)
    known = ", ".join(CATALOG)
    raise DatasetError(
        f"unknown data set '{key}': use one of {known}, or the path of a folder "
        f"holding the four IDX files ({', '.join(FILE_NAMES)})"
    )


def _load_catalog(spec: DatasetSpec, log) -> DatasetArrays:
    payloads = {name: read_verified(spec, name) for name in FILE_NAMES}
    if any(p is None for p in payloads.values()):
        provision(spec, log)
        payloads = {name: read_verified(spec, name) for name in FILE_NAMES}
    folder = dataset_dir(spec)
    arrays = {}
    for name, data in payloads.items():
        if data is None:  # deleted between provisioning and reading
            raise DatasetError(f"{folder / name}: vanished; run `mnist-cnn data fetch {spec.name}`")
        arrays[name] = parse_idx(data, str(folder / name))
    return _checked(spec.name, arrays, spec.classes, folder)


def resolve_folder_files(folder: Path) -> dict[str, Path]:
    """Map each of the four IDX file names to its path in `folder` (raw or .gz)."""
    found, missing = {}, []
    for name in FILE_NAMES:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            missing.append(name)
    if missing:
        raise DatasetError(
            f"{folder}: missing {', '.join(missing)} (raw or .gz); an MNIST-format folder "
            f"needs all four of {', '.join(FILE_NAMES)}"
        )
    return found


def _load_folder(folder: Path) -> DatasetArrays:
    files = resolve_folder_files(folder)
    arrays = {name: read_idx(path) for name, path in files.items()}
    for name in (TRAIN_LABELS, TEST_LABELS):
        _check_labels(arrays[name], MAX_CLASSES, files[name])
    train = arrays[TRAIN_LABELS]
    if train.size == 0:
        raise DatasetError(
            f"{files[TRAIN_LABELS]}: the training split is empty: a data set needs "
            "training images and labels"
        )
    test = arrays[TEST_LABELS]
    largest = max(int(train.max()), int(test.max()) if test.size else 0)
    classes = tuple(str(i) for i in range(largest + 1))  # _assemble refuses test-only classes
    return _checked(str(folder), arrays, classes, folder)


def _check_labels(labels: np.ndarray, num_classes: int, where) -> None:
    """Integer labels of rank 1 in 0..num_classes-1: checked before anything counts classes
    (a label of 2,000,000,000 would otherwise make as many)."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{where}: expected integer labels of rank 1, got {labels.dtype} rank "
            f"{labels.ndim}: store one class number per image (IDX type 0x08, unsigned byte)"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{where}: labels must lie in 0..{num_classes - 1}, "
            f"found {labels.min()}..{labels.max()}: number the classes 0..K-1, "
            f"K at most {MAX_CLASSES}"
        )


def _check_test_classes(train: np.ndarray, test: np.ndarray, where) -> None:
    """Every class of the test split occurs in the training split: a model cannot learn a
    class it never sees, and its test accuracy would silently count it wrong."""
    missing = np.setdiff1d(np.unique(test), np.unique(train))
    if missing.size:
        shown = ", ".join(str(i) for i in missing[:10]) + (", ..." if missing.size > 10 else "")
        raise DatasetError(
            f"{where}: the test split has classes the training split never shows ({shown}): "
            "give the training split examples of every class"
        )


def _checked(name: str, arrays: dict, classes: tuple[str, ...], folder: Path) -> DatasetArrays:
    for split, img_name, lbl_name in (
        ("train", TRAIN_IMAGES, TRAIN_LABELS),
        ("test", TEST_IMAGES, TEST_LABELS),
    ):
        images, labels = arrays[img_name], arrays[lbl_name]
        where = folder / img_name
        _check_labels(labels, len(classes), folder / lbl_name)
        if len(labels) == 0:
            raise DatasetError(
                f"{folder / lbl_name}: the {split} split is empty: a data set needs "
                f"{split} images and labels"
            )
        if images.dtype != np.uint8 or images.ndim != 3:
            raise DatasetError(
                f"{where}: expected uint8 images of rank 3, got {images.dtype} rank {images.ndim}"
            )
        if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise DatasetError(
                f"{where}: images are {images.shape[1]}x{images.shape[2]}, the models need 28x28"
            )
        if len(images) != len(labels):
            raise DatasetError(
                f"{folder / lbl_name}: {len(labels)} labels for {len(images)} images in {where}"
            )
    _check_test_classes(arrays[TRAIN_LABELS], arrays[TEST_LABELS], folder / TEST_LABELS)
    return DatasetArrays(name, arrays, classes, folder)
