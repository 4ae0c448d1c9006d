"""Data sets as in-memory uint8 tensors: `load_dataset("mnist")` and friends (`sets.py`).

The names are imported on first use, so that the catalogue, the cache and the fetching
code (`catalog`, `fetch`, `idx`) load without PyTorch: `mnist-cnn data list` answers fast.
"""

from __future__ import annotations

from mnist_cnn.lazy import lazy_exports

_PUBLIC = {
    "CATALOG": "mnist_cnn.data.catalog",
    "Dataset": "mnist_cnn.data.sets",
    "Split": "mnist_cnn.data.sets",
    "load_dataset": "mnist_cnn.data.sets",
    "resolve_folder_files": "mnist_cnn.data.sets",
}

__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
