"""2x2 max pooling for CPU: the same values and gradients as PyTorch's, less memory traffic.

Why this is written by hand: PyTorch's CPU max pooling records the position of every
window's maximum as an int64 index (as many bytes as a bfloat16 input four times its
size), even when no gradient is wanted, and its backward zero-fills the whole input-sized
gradient before scattering into it. On two cores the seed network's first pooling layer is
bound by memory bandwidth, so that traffic made pooling about a third of each training
step. `_pool2x2.c` keeps a one-byte code per window instead, writes each gradient element
once, and runs on PyTorch's own OpenMP threads. Seed network on 2 cores, bf16,
channels-last: 2.15 -> 1.68 s per epoch (`benchmarks/step_time.py`); evaluating the 10,000
test images, float32: 0.150 -> 0.115 s. No library offers this: PyTorch's other CPU pooling
(oneDNN) needs its own tensor layout and conversions to and from it.

The kernel is compiled with the system C compiler on first use (0.2 s) and cached beside
the data (`<cache>/kernels`). A cached library is loaded only if this user owns it and its
folder and nobody else may write either; otherwise it is rebuilt (in a private temporary
folder if the cache folder itself cannot be trusted), and `kernel_status` says why.
It runs for real channels-last CPU tensors in bfloat16 or float32, in training and in
inference; anything else (other layouts and devices, tracing, export, torch.compile) gets
PyTorch's `MaxPool2d(2)`, as does everything where no compiler works or
MNIST_CNN_NATIVE_POOL=1 is set. Results are identical either way: tests/test_pool.py
checks values and gradients bit for bit, ties and NaN included, and that training steps
give identical weights.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from mnist_cnn.cache import kernels_dir
from mnist_cnn.cpu import cpu_flags

SOURCE = "_pool2x2.c"
BASE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-Wno-unknown-pragmas")
NATIVE_ENV = "MNIST_CNN_NATIVE_POOL"

_lock = threading.Lock()
_kernels: dict[torch.dtype, tuple] | None = None
_why_not: str | None = None  # why the kernel is unavailable, once known
_note: str | None = None  # why the cached kernel was not the one loaded, if it was not


def _native_forced() -> bool:
    return os.environ.get(NATIVE_ENV, "") not in ("", "0")


def kernel_status() -> str:
    """'compiled' when pooling runs the C kernel where it applies, else 'pytorch (<why>)'."""
    if _native_forced():
        return f"pytorch ({NATIVE_ENV} is set)"
    if not _load():
        return f"pytorch ({_why_not})"
    return f"compiled ({_note})" if _note else "compiled"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _flag_choices() -> list[tuple[str, ...]]:
    """Compiler flags to try, best first.

    `-fopenmp`: the kernel's loops run on PyTorch's own OpenMP threads (the bundled
    libgomp is already loaded, so the library binds to it). `-mavx2` where the CPU has it.
    Not `-march=native`: its AVX-512 code ran the first layer's forward 15 times slower on
    the development machine (AMD EPYC), while AVX2 is as fast as memory allows.
    Seed network, layer 1 (128x16x28x28 bf16), two threads: forward 0.35 (plain) -> 0.18 ms
    (OpenMP + AVX2), against 0.31 for PyTorch's; backward 0.05 ms, against about 0.6.
    """
    simd = ("-mavx2",) if "avx2" in cpu_flags() else ()
    return [(*BASE_FLAGS, "-fopenmp", *simd), (*BASE_FLAGS, *simd), BASE_FLAGS]


def _build(source: bytes, target: Path, flags: tuple[str, ...]) -> None:
    """Compile `source` into `target` via a temp file and a rename (so never half-written)."""
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler found (cc, gcc or $CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / SOURCE
        src.write_bytes(source)
        out = Path(tmp) / target.name
        done = subprocess.run(
            [compiler, *flags, "-o", str(out), str(src)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise OSError(f"{compiler} failed: {first}")
        os.chmod(out, 0o755)  # whatever the umask: writable by this user alone
        os.replace(out, target)


def _untrusted(path: Path) -> str | None:
    """Why a kernel file or folder must not be loaded from, or None: a symbolic link,
    another user's, or writable by group or others (then anyone could swap the code)."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return f"{path} is a symbolic link"
    if info.st_uid != os.getuid():
        return f"{path} belongs to another user"
    if info.st_mode & 0o022:
        return f"{path} may be written by group or others"
    return None


def _library_path(source: bytes, flags: tuple[str, ...]) -> Path:
    key = hashlib.sha256(source + " ".join(flags).encode() + platform.machine().encode())
    return kernels_dir() / f"pool2x2-{key.hexdigest()[:16]}.so"


def _compiled_library() -> ctypes.CDLL:
    """The kernel library: from the cache, else compiled with the best flags that work."""
    source = resources.files("mnist_cnn").joinpath(SOURCE).read_bytes()
    global _note
    failure: OSError | None = None
    for flags in _flag_choices():
        path = _library_path(source, flags)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            distrust = _untrusted(path.parent)
            if distrust is None:
                distrust = os.path.lexists(path) and _untrusted(path)
                if distrust or not os.path.lexists(path):
                    _build(source, path, flags)  # a rename: replaces an untrusted file
                    _note = f"{distrust}: rebuilt" if distrust else None
                return ctypes.CDLL(str(path))
            with tempfile.TemporaryDirectory(prefix="mnist-cnn-kernel-") as private:
                path = Path(private) / path.name
                try:
                    _build(source, path, flags)
                except OSError as exc:
                    raise OSError(f"{distrust}, and building elsewhere failed: {exc}") from None
                library = ctypes.CDLL(str(path))  # stays mapped once the file is gone
            _note = f"{distrust}: built in a private folder instead"
            return library
        except OSError as exc:
            failure = failure or exc
    raise failure


def _load() -> dict[torch.dtype, tuple] | None:
    """The compiled kernels by dtype (compiling them on first use), or None if unavailable."""
    global _kernels, _why_not
    if _kernels is not None:  # every forward asks: no lock once loaded
        return _kernels
    with _lock:
        if _kernels is not None or _why_not is not None:
            return _kernels
        try:
            lib = _compiled_library()
        except (OSError, subprocess.SubprocessError) as exc:
            _why_not = f"pooling kernel unavailable: {exc}"
            return None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        kernels = {}
        for dtype, suffix in ((torch.bfloat16, "bf16"), (torch.float32, "f32")):
            forward = getattr(lib, f"pool2x2_forward_{suffix}")
            backward = getattr(lib, f"pool2x2_backward_{suffix}")
            for fn in (forward, backward):
                fn.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
                fn.restype = None
            kernels[dtype] = (forward, backward)
        _kernels = kernels
        return _kernels


def _pool_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled, one-byte argmax code per window) through the C kernel."""
    n, c, h, w = x.shape
    forward, _ = _kernels[x.dtype]
    y = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
    code = torch.empty((n, h // 2, w // 2, c), dtype=torch.uint8)
    forward(x.data_ptr(), y.data_ptr(), code.data_ptr(), n, h, w, c, torch.get_num_threads())
    return y, code


class _MaxPool2x2(torch.autograd.Function):
    """Channels-last 2x2 max pooling through the C kernel; the caller checked the input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y, code = _pool_forward(x)
        ctx.save_for_backward(code)
        ctx.input_shape = x.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (code,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        _, backward = _kernels[grad.dtype]
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty((n, c, h, w), dtype=grad.dtype, memory_format=torch.channels_last)
        backward(
            grad.data_ptr(), code.data_ptr(), grad_x.data_ptr(), n, h, w, c, torch.get_num_threads()
        )
        return grad_x


def _kernel_applies(x: torch.Tensor) -> bool:
    """Whether `x` is a real (not traced or fake) channels-last CPU tensor the kernel handles."""
    return (
        type(x) is torch.Tensor
        and x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float32)
        and x.dim() == 4
        and x.shape[2] >= 2
        and x.shape[3] >= 2
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not _native_forced()
        and _load() is not None
    )


class MaxPool2x2(nn.MaxPool2d):
    """`nn.MaxPool2d(2)` that runs the C kernel where it applies (see the module)."""

    def __init__(self):
        super().__init__(kernel_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _kernel_applies(x):
            return super().forward(x)
        if x.requires_grad and torch.is_grad_enabled():
            return _MaxPool2x2.apply(x)
        return _pool_forward(x)[0]
