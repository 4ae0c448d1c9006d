"""IDX files: round trips, and malformed input is a DatasetError, never a wrong array."""

from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mnist_cnn.data import load_dataset
from mnist_cnn.data.catalog import FILE_NAMES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from mnist_cnn.data.idx import (
    GZIP_MAGIC,
    IDX_DTYPES,
    MAX_RANK,
    encode_idx,
    parse_idx,
    read_idx,
    write_idx,
)
from mnist_cnn.errors import DatasetError, UserError

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NATIVE_DTYPES = [dt.newbyteorder("=") for dt in IDX_DTYPES.values()]


def assert_same_array(result: np.ndarray, expected: np.ndarray) -> None:
    """Same shape, same native dtype and the same bytes (so NaN payloads count too)."""
    native = expected.dtype.newbyteorder("=")
    assert result.shape == expected.shape
    assert result.dtype == native
    assert result.dtype.isnative
    assert result.tobytes() == expected.astype(native).tobytes()


def assert_parses_faithfully(data: bytes | bytearray, decoded: np.ndarray) -> None:
    """An array that came back must be exactly what `data` encodes: re-encoding gives `data`."""
    assert decoded.dtype.isnative
    assert encode_idx(decoded) == bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the property tests' files (each example overwrites its file)."""
    return tmp_path_factory.mktemp("idx")


# --- the format, byte for byte ----------------------------------------------------------------


def test_encode_writes_lecun_header_for_mnist_images_and_labels():
    images = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    labels = np.array([5, 0, 4], dtype=np.uint8)
    enc = encode_idx(images)
    assert enc[:4] == b"\x00\x00\x08\x03"
    assert struct.unpack(">3I", enc[4:16]) == (2, 28, 28)
    assert enc[16:] == images.tobytes()
    assert encode_idx(labels) == b"\x00\x00\x08\x01" + struct.pack(">I", 3) + bytes([5, 0, 4])


def test_encode_stores_multibyte_values_big_endian():
    enc = encode_idx(np.array([1, -2], dtype="<i4"))
    assert enc == b"\x00\x00\x0c\x01" + struct.pack(">I", 2) + struct.pack(">ii", 1, -2)
    assert encode_idx(np.array([1, -2], dtype=">i4")) == enc


@pytest.mark.parametrize(
    "array",
    [np.zeros(3, dtype=bool), np.zeros(3, dtype=np.int64), np.array(7, dtype=np.uint8)],
    ids=["bool", "int64", "rank0"],
)
def test_encode_refuses_what_idx_cannot_store(array):
    with pytest.raises(ValueError, match="IDX cannot store"):
        encode_idx(array)


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", "<i2", "i4", ">f4", "<f4", "f8"])
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 28, 28), (0, 28, 28), (2, 1, 3, 1, 2)])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_then_read_round_trips(tmp_path, dtype, shape, suffix):
    rng = np.random.default_rng(sum(shape))
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path / f"a-idx{suffix}"
    write_idx(path, array)
    raw = path.read_bytes()
    assert raw.startswith(GZIP_MAGIC) == (suffix == ".gz")
    assert_same_array(read_idx(path), array)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_compression_is_detected_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.int16).reshape(3, 4)
    gz_named_raw = tmp_path / "raw.gz"
    raw_named_gz = tmp_path / "packed"
    write_idx(gz_named_raw, array, compress=False)
    write_idx(raw_named_gz, array, compress=True)
    assert gz_named_raw.read_bytes() == encode_idx(array)
    assert gzip.decompress(raw_named_gz.read_bytes()) == encode_idx(array)
    assert_same_array(read_idx(gz_named_raw), array)
    assert_same_array(read_idx(raw_named_gz), array)


def test_write_idx_replaces_an_existing_file(tmp_path):
    path = tmp_path / "x-idx"
    write_idx(path, np.zeros((5, 5), dtype=np.uint8))
    write_idx(path, np.ones(2, dtype=np.float64))
    assert_same_array(read_idx(path), np.ones(2, dtype=np.float64))
    assert [p.name for p in tmp_path.iterdir()] == ["x-idx"]


@st.composite
def idx_arrays(draw) -> np.ndarray:
    dtype = draw(st.sampled_from(NATIVE_DTYPES))
    byteorder = draw(st.sampled_from(["=", ">"]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5))
    return draw(hnp.arrays(dtype.newbyteorder(byteorder), shape))


@PROPERTY
@given(array=idx_arrays(), compress=st.booleans())
def test_round_trip_property(scratch, array, compress):
    assert_same_array(parse_idx(encode_idx(array)), array)
    path = scratch / "round-trip"
    write_idx(path, array, compress=compress)
    assert_same_array(read_idx(path), array)


# --- malformed input: DatasetError naming the file, never another exception ------------------


@PROPERTY
@given(array=idx_arrays(), data=st.data())
def test_truncated_payload_is_an_error(array, data):
    enc = encode_idx(array)
    cut = data.draw(st.integers(0, len(enc) - 1), label="cut")
    with pytest.raises(DatasetError, match=r"^some-file: "):
        parse_idx(enc[:cut], "some-file")


@PROPERTY
@given(array=idx_arrays(), extra=st.binary(min_size=1, max_size=64))
def test_padded_payload_is_an_error(array, extra):
    with pytest.raises(DatasetError, match=r"^some-file: has trailing bytes"):
        parse_idx(encode_idx(array) + extra, "some-file")


@st.composite
def header_and_payload(draw) -> tuple[bytes, int]:
    """A valid IDX header, a payload of arbitrary length, and the length the header implies."""
    code = draw(st.sampled_from(sorted(IDX_DTYPES)))
    dims = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))
    header = struct.pack(f">HBB{len(dims)}I", 0, code, len(dims), *dims)
    expected = int(np.prod(dims)) * IDX_DTYPES[code].itemsize
    length = draw(st.one_of(st.integers(0, expected + 16), st.just(expected)))
    payload = draw(st.binary(min_size=length, max_size=length))
    return header + payload, expected


@PROPERTY
@given(case=header_and_payload())
def test_header_with_payload_of_any_length(case):
    data, expected_payload = case
    payload_len = len(data) - (4 + 4 * data[3])
    if payload_len == expected_payload:
        assert_parses_faithfully(data, parse_idx(data, "f"))
    else:
        with pytest.raises(DatasetError, match=r"^f: (truncated|has trailing bytes)"):
            parse_idx(data, "f")


def idx_prefixed_bytes() -> st.SearchStrategy[bytes]:
    """Random bytes that often get past the magic number, to reach the deeper checks."""
    magic = st.builds(
        lambda code, rank: bytes([0, 0, code, rank]),
        st.sampled_from([*IDX_DTYPES, 0x00, 0x0A, 0xFF]),
        st.integers(0, MAX_RANK + 2),
    )
    return st.builds(bytes.__add__, magic, st.binary(max_size=120))


ANY_BYTES = st.one_of(st.binary(max_size=200), idx_prefixed_bytes())


@PROPERTY
@given(data=ANY_BYTES)
def test_parse_random_bytes_is_an_error_or_exactly_the_encoded_array(data):
    try:
        decoded = parse_idx(bytearray(data), "random")
    except DatasetError as exc:
        assert str(exc).startswith("random: ")
    else:
        assert_parses_faithfully(data, decoded)


@PROPERTY
@given(data=ANY_BYTES)
def test_read_gzipped_random_bytes_is_an_error_or_exactly_the_encoded_array(scratch, data):
    path = scratch / "random.gz"
    path.write_bytes(gzip.compress(data))
    try:
        decoded = read_idx(path)
    except DatasetError as exc:
        assert str(exc).startswith(f"{path}: ")
    else:
        assert_parses_faithfully(data, decoded)


@PROPERTY
@given(tail=st.binary(max_size=200))
def test_read_random_bytes_after_gzip_magic_never_crashes(scratch, tail):
    path = scratch / "fake.gz"
    path.write_bytes(GZIP_MAGIC + tail)
    try:
        decoded = read_idx(path)
    except DatasetError as exc:
        assert str(exc).startswith(f"{path}: ")
    else:  # only possible when the tail happens to complete a real gzip stream
        assert_parses_faithfully(gzip.decompress(GZIP_MAGIC + tail), decoded)


@PROPERTY
@given(array=idx_arrays(), data=st.data())
def test_read_truncated_gzip_is_an_error(scratch, array, data):
    packed = gzip.compress(encode_idx(array))
    cut = data.draw(st.integers(0, len(packed) - 1), label="cut")
    path = scratch / "truncated.gz"
    path.write_bytes(packed[:cut])
    with pytest.raises(DatasetError, match=f"^{path}: "):
        read_idx(path)


@PROPERTY
@given(array=idx_arrays(), compress=st.booleans(), data=st.data())
def test_read_file_with_a_flipped_byte_is_an_error_or_exactly_the_encoded_array(
    scratch, array, compress, data
):
    enc = encode_idx(array)
    stored = bytearray(gzip.compress(enc, mtime=0) if compress else enc)
    where = data.draw(st.integers(0, len(stored) - 1), label="where")
    flip = data.draw(st.integers(1, 255), label="flip")
    stored[where] ^= flip
    path = scratch / "flipped"
    path.write_bytes(stored)
    try:
        decoded = read_idx(path)
    except DatasetError as exc:
        assert str(exc).startswith(f"{path}: ")
    else:
        payload = gzip.decompress(stored) if stored[:2] == GZIP_MAGIC else stored
        assert_parses_faithfully(payload, decoded)


# --- each kind of error, and that its message names the file ---------------------------------


def _valid(array=None) -> bytes:
    return encode_idx(np.arange(24, dtype=np.uint8).reshape(2, 3, 4) if array is None else array)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "too short for an IDX header"),
        (b"\x00\x00\x08", "too short for an IDX header"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
        (b"\x01\x00" + _valid()[2:], "bad magic number 0x01000803"),
        (b"\x00\x00\x07\x03" + _valid()[4:], "bad magic number 0x00000703"),
        (b"\x00\x00\x08\x00" + _valid()[4:], "unsupported rank 0"),
        (b"\x00\x00\x08\x09" + b"\x00" * 40, "unsupported rank 9"),
        (_valid()[:-1], "truncated: header says shape (2, 3, 4) (40 bytes), file has 39 bytes"),
        (_valid() + b"\x00", "has trailing bytes"),
        (gzip.compress(_valid())[:-3], "corrupt gzip data"),
        (GZIP_MAGIC + b"not really gzip", "corrupt gzip data"),
        (gzip.compress(_valid()[:-5]), "truncated"),
    ],
    ids=[
        "empty",
        "3-bytes",
        "short-header",
        "magic-not-zero",
        "unknown-type",
        "rank-0",
        "rank-9",
        "truncated",
        "padded",
        "truncated-gzip",
        "fake-gzip",
        "gzip-of-truncated",
    ],
)
def test_read_errors_name_the_file_and_the_problem(tmp_path, content, expected):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_read_missing_file_or_folder_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nope-idx1-ubyte"
    with pytest.raises(DatasetError, match="cannot read") as info:
        read_idx(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(DatasetError, match="cannot read") as info:
        read_idx(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_dataset_error_is_a_user_error():
    assert issubclass(DatasetError, UserError)


@pytest.mark.parametrize("code", sorted(IDX_DTYPES))
def test_every_type_code_parses_to_a_native_array(code):
    dtype = IDX_DTYPES[code]
    values = np.array([[0, 1, 2], [3, 4, 5]], dtype=dtype)
    data = struct.pack(">HBB2I", 0, code, 2, 2, 3) + values.tobytes()
    decoded = parse_idx(data)
    assert decoded.dtype == dtype.newbyteorder("=")
    np.testing.assert_array_equal(decoded, [[0, 1, 2], [3, 4, 5]])


@pytest.mark.parametrize("dtype", ["u1", "i1", "f4"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_returns_a_writable_array(tmp_path, dtype, suffix):
    path = tmp_path / f"w{suffix}"
    write_idx(path, np.arange(6, dtype=dtype))
    array = read_idx(path)
    assert array.flags.writeable
    array[0] = 5  # and writing to it is fine
    assert array[0] == 5


# --- MNIST-format folders through load_dataset ------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_load_dataset_reads_a_folder(tiny_idx_folder, gz):
    folder = tiny_idx_folder(gz=gz)
    suffix = ".gz" if gz else ""
    arrays = {name: read_idx(folder / f"{name}{suffix}") for name in FILE_NAMES}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about a read-only array
        ds = load_dataset(str(folder))
    assert ds.name == str(folder)
    assert ds.classes == tuple(str(i) for i in range(10))
    assert ds.num_classes == 10
    assert (len(ds.train), len(ds.test)) == (50, 20)
    assert ds.split("train") is ds.train and ds.split("test") is ds.test
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    np.testing.assert_array_equal(ds.train.images.numpy(), arrays[TRAIN_IMAGES])
    np.testing.assert_array_equal(ds.train.labels.numpy(), arrays[TRAIN_LABELS])
    np.testing.assert_array_equal(ds.test.labels.numpy(), arrays[TEST_LABELS])
    ds.train.images[0, 0, 0] = 7  # tensors own writable memory
    with pytest.raises(DatasetError, match="unknown split 'valid'"):
        ds.split("valid")


def test_load_dataset_folder_classes_follow_the_largest_label(tiny_idx_folder):
    folder = tiny_idx_folder()
    write_idx(folder / TRAIN_LABELS, (np.arange(50) % 4).astype(np.uint8))
    write_idx(folder / TEST_LABELS, np.full(20, 2, dtype=np.uint8))
    assert load_dataset(folder).classes == ("0", "1", "2", "3")


@pytest.mark.parametrize(
    ("name", "array", "expected"),
    [
        (TRAIN_IMAGES, np.zeros((50, 32, 32), np.uint8), "images are 32x32, the models need 28x28"),
        (TRAIN_IMAGES, np.zeros((50, 784), np.uint8), "expected uint8 images of rank 3"),
        (TRAIN_IMAGES, np.zeros((50, 28, 28), np.float32), "expected uint8 images of rank 3"),
        (TRAIN_LABELS, np.zeros((50, 1), np.uint8), "expected integer labels of rank 1"),
        (TRAIN_LABELS, np.full(50, -1, np.int8), r"labels must lie in 0\.\..*found -1\.\.-1"),
    ],
    ids=["32x32", "flat", "float", "labels-rank-2", "negative-labels"],
)
def test_load_dataset_refuses_folders_the_models_cannot_use(tiny_idx_folder, name, array, expected):
    folder = tiny_idx_folder()
    write_idx(folder / name, array)
    with pytest.raises(DatasetError, match=expected) as info:
        load_dataset(folder)
    assert str(folder / name) in str(info.value)


def test_load_dataset_unknown_name_lists_the_choices(tmp_path):
    with pytest.raises(DatasetError, match="unknown data set 'nope': use one of mnist, fashion"):
        load_dataset("nope")
    with pytest.raises(DatasetError, match="or the path of a folder holding the four IDX files"):
        load_dataset(tmp_path / "absent")
