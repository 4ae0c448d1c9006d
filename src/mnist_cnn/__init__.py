"""mnist-cnn: train, evaluate, explain and serve small CNNs on MNIST and Fashion-MNIST."""

from mnist_cnn.data import Dataset, Split, load_dataset
from mnist_cnn.errors import DatasetError, UserError
from mnist_cnn.metrics import Evaluation, evaluate
from mnist_cnn.models import build_model
from mnist_cnn.recipes import Recipe, resolve_recipe
from mnist_cnn.rundir import load_model
from mnist_cnn.train import TrainResult, fit

__version__ = "0.1.0"

__all__ = [
    "Dataset",
    "DatasetError",
    "Evaluation",
    "Recipe",
    "Split",
    "TrainResult",
    "UserError",
    "build_model",
    "evaluate",
    "fit",
    "load_dataset",
    "load_model",
    "resolve_recipe",
]
