"""Read and write IDX files (LeCun's MNIST format), raw or gzip-compressed.

An IDX file is a big-endian header followed by the raw array:
two zero bytes, one byte for the element type, one byte for the rank, then one
uint32 per dimension. The reader checks every part of that header and that the
payload is exactly as long as the header says, so a truncated or padded file is
an error rather than a silently wrong array.

Files are read as streams, header first: a gzip file is inflated only as far as its header
says (plus one byte, to notice a longer one), so a small file that would inflate to
gigabytes costs no more than the size its header declares, and that size is bounded
(`MAX_IDX_BYTES`, or a smaller limit the caller knows, such as a catalogued size).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

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
# The most one IDX file may declare (header included): eight times MNIST's training
# images, more than any MNIST-format set a 28x28 model trains on (EMNIST's largest: 0.55 GB).
MAX_IDX_BYTES = 2**31
_GZIP_ERRORS = (OSError, EOFError, zlib.error)


def gunzip_bounded(data: bytes | bytearray, name: str, max_bytes: int) -> bytearray:
    """Inflate gzip `data`, refusing it as soon as it inflates past `max_bytes`."""
    out = bytearray()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as source:
            while chunk := source.read(1 << 20):
                out += chunk
                if len(out) > max_bytes:
                    raise DatasetError(f"{name}: inflates to more than {max_bytes:,} bytes")
    except _GZIP_ERRORS as exc:
        raise DatasetError(f"{name}: corrupt gzip data ({exc})") from None
    return out


def decompress_if_gzip(
    data: bytes | bytearray, name: str, max_bytes: int = MAX_IDX_BYTES
) -> bytes | bytearray:
    """Return the payload of `data`, gunzipped (at most `max_bytes`) when it starts with
    the gzip magic."""
    if bytes(data[:2]) != GZIP_MAGIC:
        return data
    # A bytearray, like an uncompressed read, so arrays parsed from it are writable.
    return gunzip_bounded(data, name, max_bytes)


def _header(data: bytes | bytearray, name: str) -> tuple[int, tuple[int, ...], np.dtype, int]:
    """(header length, dims, dtype, the payload's length in bytes) from the start of an IDX
    payload, which must hold the whole header."""
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
    return header_len, dims, dtype, header_len + math.prod(dims) * dtype.itemsize


def read_idx_payload(stream: BinaryIO, name: str, max_bytes: int = MAX_IDX_BYTES) -> bytearray:
    """The uncompressed IDX payload (header and array) in a seekable binary stream, raw or
    gzip (told by content): exactly as many bytes as its header declares, read or inflated no
    further (one byte more, to notice a longer file). DatasetError if the header declares
    more than `max_bytes`, or the stream holds less or more than it declares."""
    zipped = stream.read(2) == GZIP_MAGIC
    size = None if zipped else stream.seek(0, io.SEEK_END)
    stream.seek(0)
    source = gzip.GzipFile(fileobj=stream) if zipped else stream
    try:
        head = source.read(4)
        if len(head) == 4 and 0 < head[3] <= MAX_RANK:
            head += source.read(4 * head[3])
        _, dims, _, expected = _header(head, name)
        declared = f"header says shape {tuple(dims)} ({expected} bytes)"
        if expected > max_bytes:
            raise DatasetError(f"{name}: {declared}, over the {max_bytes:,} bytes it may hold")
        if size is not None and size != expected:  # raw: its length is known before reading
            what = "truncated" if size < expected else "has trailing bytes"
            raise DatasetError(f"{name}: {what}: {declared}, file has {size} bytes")
        # Grown as bytes arrive (not allocated at the declared size up front), so memory
        # follows what the stream really holds.
        payload = bytearray(head)
        while len(payload) < expected:
            chunk = source.read(min(1 << 22, expected - len(payload)))
            if not chunk:
                raise DatasetError(f"{name}: truncated: {declared}, file has {len(payload)} bytes")
            payload += chunk
        if source.read(1):
            raise DatasetError(f"{name}: has trailing bytes: {declared}, file has more")
    except _GZIP_ERRORS as exc:
        if not zipped:
            raise
        raise DatasetError(f"{name}: corrupt gzip data ({exc})") from None
    return payload


def parse_idx(data: bytes | bytearray, name: str = "<bytes>") -> np.ndarray:
    """Parse an uncompressed IDX payload into a native-endian numpy array.

    `name` only serves the error messages. Raises DatasetError for any violation.
    """
    header_len, dims, dtype, expected = _header(data, name)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DatasetError(
            f"{name}: {what}: header says shape {tuple(dims)} ({expected} bytes), "
            f"file has {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file, raw or gzip (detected by content, not by name), no further than its
    header declares (at most `max_bytes`)."""
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            data = read_idx_payload(stream, str(path), max_bytes)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_idx(data, str(path))


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
