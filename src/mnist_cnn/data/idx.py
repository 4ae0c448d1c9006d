"""Read and write IDX files (LeCun's MNIST format), raw or gzip-compressed.

An IDX file is a big-endian header followed by the raw array:
two zero bytes, one byte for the element type, one byte for the rank, then one
uint32 per dimension. The reader checks every part of that header and that the
payload is exactly as long as the header says, so a truncated or padded file is
an error rather than a silently wrong array.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from mnist_cnn.errors import DatasetError
from mnist_cnn.io import write_atomic

GZIP_MAGIC = b"\x1f\x8b"

# IDX type byte -> numpy dtype (big-endian, as the format stores it).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_TYPE_CODES = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}

# A guard against headers that claim absurd sizes (a random 4-byte dimension).
MAX_RANK = 8


def decompress_if_gzip(data: bytes | bytearray, name: str) -> bytes | bytearray:
    """Return the payload of `data`, gunzipped when it starts with the gzip magic."""
    if bytes(data[:2]) != GZIP_MAGIC:
        return data
    try:
        # A bytearray, like an uncompressed read, so arrays parsed from it are writable.
        return bytearray(gzip.decompress(data))
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{name}: corrupt gzip data ({exc})") from None


def parse_idx(data: bytes | bytearray, name: str = "<bytes>") -> np.ndarray:
    """Parse an uncompressed IDX payload into a native-endian numpy array.

    `name` only serves the error messages. Raises DatasetError for any violation.
    """
    if len(data) < 4:
        raise DatasetError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    zero, type_code, rank = struct.unpack_from(">HBB", data, 0)
    if zero != 0 or type_code not in IDX_DTYPES:
        raise DatasetError(f"{name}: bad magic number 0x{bytes(data[:4]).hex()} (not an IDX file)")
    if rank == 0 or rank > MAX_RANK:
        raise DatasetError(f"{name}: unsupported rank {rank} in the IDX header")
    header_len = 4 + 4 * rank
    if len(data) < header_len:
        raise DatasetError(f"{name}: truncated IDX header (rank {rank}, {len(data)} bytes)")
    dims = struct.unpack_from(f">{rank}I", data, 4)
    dtype = IDX_DTYPES[type_code]
    expected = header_len + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DatasetError(
            f"{name}: {what}: header says shape {tuple(dims)} ({expected} bytes), "
            f"file has {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, raw or gzip (detected by content, not by name)."""
    path = Path(path)
    try:
        data = bytearray(path.read_bytes())
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_idx(decompress_if_gzip(data, str(path)), str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """Return the IDX bytes of `array` (uncompressed)."""
    array = np.asarray(array)
    code = _TYPE_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    if not 1 <= array.ndim <= MAX_RANK:
        raise ValueError(f"IDX cannot store rank {array.ndim}")
    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    return header + array.astype(IDX_DTYPES[code], copy=False).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write `array` as an IDX file, gzip-compressed when the name ends in .gz (or `compress`)."""
    path = Path(path)
    data = encode_idx(array)
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        data = gzip.compress(data, mtime=0)
    write_atomic(path, data)
