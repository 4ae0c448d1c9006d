"""A second baseline: the seed network as a Keras 3 user would write it, on TensorFlow (CPU).

The network and training are reference.py's: three 3x3 convolutions (16, 32, 32 filters,
padding same) each with ReLU and 2x2 max pooling, Flatten (288), Dense(10) on logits,
sparse softmax cross-entropy, Adam(1e-3), batches of 128 reshuffled every epoch, float32,
in `keras.Sequential`, `model.compile` and one `model.fit` on numpy arrays, with Keras's
default initialisation. `jit_compile` is left at Keras's default, "auto", which resolves
to False (no XLA) on a machine without an accelerator; the record says which it was.

Timing follows measure.py: an epoch runs from `on_epoch_begin` to `on_epoch_end` (the
first one includes tracing the training step into a graph, as a user pays it), and the
test pass after each epoch (`model.evaluate`, batches of 1000 as reference.py's) happens
after the clock stops; evaluation seconds are the median of `--eval-repeats` passes after
one warm-up. Threads: TensorFlow's default (0, "let the runtime pick") means one per usable
CPU for both its intra-op and inter-op pools; both are set explicitly to the number of
usable CPUs, which is what the PyTorch sides run on where a core has one hardware thread
(PyTorch counts physical cores); every record's `threads` shows the counts side by side.

It runs in its own venv without PyTorch (`make keras-env`); the flags, the JSON record and
the timing rules are measure.py's own, which loads torch only where it needs it. The data
comes through `mnist_cnn.data.arrays.read_arrays`: the project's md5-verified cache (or a
folder of IDX files) with every check `load_dataset` makes, in numpy alone.

    python benchmarks/keras_reference.py --dataset mnist --epochs 2 --seed 0 [--json]
"""

from __future__ import annotations

import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from measure import common_parser, median_seconds, report, result_record

from mnist_cnn.data.arrays import read_arrays
from mnist_cnn.data.catalog import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from mnist_cnn.errors import DatasetError

THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def seed_network(num_classes: int) -> keras.Sequential:
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(num_classes),
        ]
    )


class EpochClock(keras.callbacks.Callback):
    """Training seconds of each epoch, then the test accuracy with the clock stopped."""

    def __init__(self, x_test: np.ndarray, y_test: np.ndarray):
        super().__init__()
        self.x_test, self.y_test = x_test, y_test
        self.seconds: list[float] = []
        self.accuracies: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)
        self.accuracies.append(test_accuracy(self.model, self.x_test, self.y_test))


def test_accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    logs = model.evaluate(x, y, batch_size=1000, verbose=0, return_dict=True)
    return round(float(logs["accuracy"]), 6)  # a float32 metric: 0.498, not 0.49799999594


def main(argv: list[str] | None = None) -> int:
    args = common_parser(__doc__.splitlines()[0]).parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(THREADS)
    try:
        found = read_arrays(args.dataset)
    except DatasetError as exc:
        print(f"keras_reference.py: error: {exc}", file=sys.stderr)
        return 2
    train, test = slice(args.train_limit), slice(args.test_limit)
    arrays = found.arrays
    x_train = arrays[TRAIN_IMAGES][train, :, :, None].astype("float32") / 255
    y_train = arrays[TRAIN_LABELS][train].astype("int64")
    x_test = arrays[TEST_IMAGES][test, :, :, None].astype("float32") / 255
    y_test = arrays[TEST_LABELS][test].astype("int64")
    num_classes = len(found.classes)

    keras.utils.set_random_seed(args.seed)
    model = seed_network(num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    clock = EpochClock(x_test, y_test)
    model.fit(x_train, y_train, batch_size=128, epochs=args.epochs, shuffle=True, verbose=0,
              callbacks=[clock])  # fmt: skip

    eval_seconds = median_seconds(lambda: test_accuracy(model, x_test, y_test), args.eval_repeats)
    record = result_record(
        clock.seconds, clock.accuracies, eval_seconds, test_accuracy=clock.accuracies[-1],
        test_images=len(y_test), target=args.target, threads=THREADS, side="keras",
        precision="fp32", jit_compile=bool(model.jit_compile),
        versions=f"TensorFlow {tf.__version__}, Keras {keras.__version__}",
    )  # fmt: skip
    report(record, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
