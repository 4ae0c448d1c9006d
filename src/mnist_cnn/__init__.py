"""mnist-cnn: train, evaluate, explain and serve small CNNs on MNIST and Fashion-MNIST."""

from mnist_cnn.data import Dataset, Split, load_dataset
from mnist_cnn.errors import DatasetError, UserError

__version__ = "0.1.0"

__all__ = ["Dataset", "DatasetError", "Split", "UserError", "load_dataset"]
