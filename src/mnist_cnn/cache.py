"""Where the caches live: provisioned data sets and compiled kernels. Nothing else.

`$MNIST_CNN_CACHE`, else `$XDG_CACHE_HOME/mnist-cnn`, else `~/.cache/mnist-cnn`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The folder every cache lives under (see the module)."""
    if os.environ.get("MNIST_CNN_CACHE"):
        return Path(os.environ["MNIST_CNN_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "mnist-cnn"
    return Path.home() / ".cache" / "mnist-cnn"


def data_dir(name: str) -> Path:
    """The folder of one catalogued data set's four verified files."""
    return cache_root() / name


def kernels_dir() -> Path:
    """The folder of compiled native kernels (`mnist_cnn.pool`)."""
    return cache_root() / "kernels"
