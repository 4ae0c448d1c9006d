"""mnist-cnn: train, evaluate, explain and serve small CNNs on MNIST and Fashion-MNIST.

The public names are imported on first use, so that `mnist-cnn --help` and argument
errors answer without loading PyTorch.
"""

from __future__ import annotations

from mnist_cnn.lazy import lazy_exports

__version__ = "0.1.0"

_PUBLIC = {
    "Dataset": "mnist_cnn.data",
    "Split": "mnist_cnn.data",
    "load_dataset": "mnist_cnn.data",
    "DatasetError": "mnist_cnn.errors",
    "UserError": "mnist_cnn.errors",
    "Evaluation": "mnist_cnn.metrics",
    "evaluate": "mnist_cnn.metrics",
    "build_model": "mnist_cnn.models",
    "Recipe": "mnist_cnn.recipes",
    "resolve_recipe": "mnist_cnn.recipes",
    "Run": "mnist_cnn.run",
    "load_model": "mnist_cnn.run",
    "TrainResult": "mnist_cnn.train",
    "fit": "mnist_cnn.train",
}

__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
