"""A small MNIST-format data set in memory, for tests that write their own folders."""

from __future__ import annotations

import numpy as np

from mnist_cnn.data.catalog import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS


def tiny_arrays(n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """The four arrays of a small MNIST-format data set: random uint8 28x28 images, labels 0..9."""
    rng = np.random.default_rng(seed)
    return {
        TRAIN_IMAGES: rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        TRAIN_LABELS: (np.arange(n_train) % 10).astype(np.uint8),
        TEST_IMAGES: rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        TEST_LABELS: ((np.arange(n_test) + 3) % 10).astype(np.uint8),
    }
