"""The real data sets in the default cache (provisioned by `make setup`), as documented.

These tests read the cache only and never download: with the cache incomplete they fail,
saying to run `make setup` (or `mnist-cnn data fetch`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnist_cnn.cli import main
from mnist_cnn.data import CATALOG, Dataset, load_dataset
from mnist_cnn.data.catalog import FILE_NAMES, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from mnist_cnn.data.fetch import cache_status, dataset_dir, md5_hex
from mnist_cnn.data.idx import encode_idx
from mnist_cnn.errors import DatasetError

NAMES = ["mnist", "fashion-mnist"]

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _load_cached(name: str) -> Dataset:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNIST_CNN_SOURCES", "none")  # the cache only: no download at test time
        try:
            return load_dataset(name)
        except DatasetError as exc:
            pytest.fail(f"{exc}\n(the real-data tests need `make setup` to have run)")


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return _load_cached("mnist")


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    return _load_cached("fashion-mnist")


@pytest.mark.parametrize("name", NAMES)
def test_cached_files_verify(name):
    spec = CATALOG[name]
    assert cache_status(spec) == dict.fromkeys(FILE_NAMES, "verified")
    for file_name in FILE_NAMES:
        assert (dataset_dir(spec) / file_name).stat().st_size == spec.sizes[file_name]


@pytest.mark.parametrize("name", NAMES)
def test_loaded_tensors_are_the_verified_bytes(name, request):
    ds = request.getfixturevalue("mnist" if name == "mnist" else "fashion")
    spec = CATALOG[name]
    assert ds.name == name
    files = {"train": (TRAIN_IMAGES, TRAIN_LABELS), "test": (TEST_IMAGES, TEST_LABELS)}
    for split, (images, labels) in files.items():
        part = ds.split(split)
        assert md5_hex(encode_idx(part.images.numpy())) == spec.md5[images]
        assert md5_hex(encode_idx(part.labels.numpy().astype(np.uint8))) == spec.md5[labels]


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_dtypes(name, request):
    ds = request.getfixturevalue("mnist" if name == "mnist" else "fashion")
    assert ds.train.images.shape == (60000, 28, 28)
    assert ds.test.images.shape == (10000, 28, 28)
    assert ds.train.labels.shape == (60000,)
    assert ds.test.labels.shape == (10000,)
    for split in (ds.train, ds.test):
        assert split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
        assert split.images.is_contiguous()
        assert int(split.images.min()) == 0 and int(split.images.max()) == 255
        assert int(split.labels.min()) == 0 and int(split.labels.max()) == 9
    assert ds.num_classes == 10


def test_mnist_facts(mnist):
    assert mnist.classes == tuple(str(i) for i in range(10))
    assert mnist.train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist.test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    counts = torch.bincount(mnist.train.labels, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_fashion_facts(fashion):
    assert fashion.classes == FASHION_CLASSES
    assert fashion.train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert torch.bincount(fashion.train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(fashion.test.labels, minlength=10).tolist() == [1000] * 10


def test_the_two_data_sets_differ(mnist, fashion):
    assert not torch.equal(mnist.test.images, fashion.test.images)


def test_data_list_and_verify_report_both_verified(capsys, monkeypatch):
    monkeypatch.setenv("MNIST_CNN_SOURCES", "none")
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    states = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:]}
    assert states == {"mnist": "verified", "fashion-mnist": "verified"}
    assert main(["data", "verify"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{name}: ok, 4 files match their md5 in {dataset_dir(CATALOG[name])}" for name in NAMES
    ]
