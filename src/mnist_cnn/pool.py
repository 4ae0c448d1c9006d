"""Pooling stages for CPU through C kernels: the same functions as PyTorch's layers, less
memory traffic.

`MaxPool2x2`: 2x2 max pooling with PyTorch's values and gradients, bit for bit;
`pool_relu` the same with the ReLU that follows it applied in the same pass.

Why this is written by hand: PyTorch's CPU max pooling records the position of every
window's maximum as an int64 index (as many bytes as a bfloat16 input four times its
size), even when no gradient is wanted, and its backward zero-fills the whole input-sized
gradient before scattering into it. On two cores the seed network's first pooling layer is
bound by memory bandwidth, so that traffic made pooling about a third of each training
step. `_kernels.c` keeps a one-byte code per window instead, writes each gradient element
once, and runs on PyTorch's own OpenMP threads. Seed network on 2 cores, bf16,
channels-last: 2.15 -> 1.68 s per epoch (`benchmarks/step_time.py`); evaluating the 10,000
test images, float32: 0.150 -> 0.115 s. No library offers this: PyTorch's other CPU pooling
(oneDNN) needs its own tensor layout and conversions to and from it.

`first_stage`: a first stage of one input channel, Conv 3x3 (padding 1, bias) -> 2x2 max
pooling -> ReLU, in one pass, in training and evaluation. Why: with one input channel the
convolution is too little arithmetic for oneDNN's general path, and the stage is bound by
memory: the 28x28 maps (four times the size of anything after them) were written by the
convolution, read by the pooling, and their gradient written and read again in backward.
The kernel keeps the four sums of each window in registers and writes only the pooled
result and a one-byte code; backward needs no gradient for the image and sums the weight
gradient straight from the code and the image. Seed network, 2 cores: the stage's forward
and backward 0.87 -> 0.35-0.55 s per epoch in float32 (`step_time.py --layers`), a whole
training step 0.84-0.88x in float32 and 0.91-0.93x in bf16 (`step_time.py`), evaluating
the 10,000 test images 0.37 -> 0.28 s. Its arithmetic is the convolution's (float32
sums, or bfloat16 products summed in float32 under autocast) in another order, so results
agree with the unfused layers to float rounding, not bit for bit; tests/test_pool.py
checks both.

`norm_pool_relu`: BatchNorm2d, 2x2 max pooling and ReLU in one pass, in training (batch
statistics, running ones updated as PyTorch does) and evaluation. Why: PyTorch's CPU
BatchNorm writes the normalised maps, which pooling reads back, and backward writes and
reads their gradient; on two cores these stages are bound by memory. The kernel reads the
input for the statistics (each image's, twice while it stays in cache, then the batch's
from them in image order, so no bit depends on the thread count) and once more to
normalise, pool and apply ReLU, writing only the pooled result and a code; backward sums
what BatchNorm needs from the pooled gradient and writes each input gradient once. 128
images of 32x14x14: forward and backward 1.06 -> 0.43 ms in float32, 0.81 -> 0.55 ms in
bf16; a training step of `fast` 0.91x in float32, 0.93x in bf16 (`step_time.py --model
fast`). It agrees with the layers to float rounding, and is the closer of the two to exact
arithmetic: on 128 images of 32x28x28 its float32 output is within 1e-6 of a float64
computation, PyTorch's within 3e-5 (it sums the statistics in double precision). Hooks of
any kind on the layers, or registered for every module, turn every fusion off.

The kernels are compiled with the system C compiler on first use (under a second) and
cached beside the data (`<cache>/kernels`). A cached library is loaded only if this user
owns it and its folder and nobody else may write either; otherwise it is rebuilt (in a
private temporary folder if the cache folder itself cannot be trusted), and
`kernel_status` says why.
Pooling runs for real channels-last CPU tensors in bfloat16 or float32, in training and in
inference; the first stage and BatchNorm stages where `first_stage_applies` and
`norm_pool_relu_applies` say. Anything else (other layouts and devices, tracing, export,
torch.compile) gets PyTorch's layers, as does everything where no compiler works or
MNIST_CNN_NATIVE_POOL=1 is set. Pooling's results are
identical either way: tests/test_pool.py checks values and gradients bit for bit, ties and
NaN included, and that training steps give identical weights.
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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from mnist_cnn.cache import kernels_dir
from mnist_cnn.cpu import cpu_flags

SOURCE = "_kernels.c"
BASE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-Wno-unknown-pragmas", "-Wno-psabi")
NATIVE_ENV = "MNIST_CNN_NATIVE_POOL"


@dataclass(frozen=True)
class _Kernels:
    """The library's functions for one dtype."""

    pool_forward: ctypes._CFuncPtr
    pool_backward: ctypes._CFuncPtr
    stage_forward: ctypes._CFuncPtr
    stage_backward: ctypes._CFuncPtr
    norm_forward: ctypes._CFuncPtr
    norm_backward: ctypes._CFuncPtr


_lock = threading.Lock()
_kernels: dict[torch.dtype, _Kernels] | None = None
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
    `-mfma -ffp-contract=fast` where the CPU has FMA: the first stage's multiply-adds as
    one instruction each (forward 0.8 -> 0.5 ms on one thread).
    """
    flags = cpu_flags()
    simd = ("-mavx2",) if "avx2" in flags else ()
    if simd and "fma" in flags:
        simd += ("-mfma", "-ffp-contract=fast")
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
    return kernels_dir() / f"kernels-{key.hexdigest()[:16]}.so"


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


def _load() -> dict[torch.dtype, _Kernels] | None:
    """The compiled kernels by dtype (compiling them on first use), or None if unavailable."""
    global _kernels, _why_not
    if _kernels is not None:  # every forward asks: no lock once loaded
        return _kernels
    with _lock:
        if _kernels is not None or _why_not is not None:
            return _kernels
        try:
            lib = _compiled_library()
        except (OSError, AttributeError, subprocess.SubprocessError) as exc:
            _why_not = f"pooling kernel unavailable: {exc}"
            return None
        i64, ptr, cint, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
        signatures = {
            "pool2x2_forward": [ptr, ptr, ptr, i64, i64, i64, i64, cint, cint],
            "pool2x2_backward": [ptr, ptr, ptr, i64, i64, i64, i64, cint],
            "stage1_forward": [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, cint],
            "stage1_backward": [ptr, ptr, ptr, ptr, i64, i64, i64, i64, cint],
            "bnpool_forward": [ptr] * 5 + [f64, f64, cint] + [ptr] * 5 + [i64] * 4 + [cint],
            "bnpool_backward": [ptr] * 6 + [cint] + [ptr] * 4 + [i64] * 4 + [cint],
        }
        kernels = {}
        for dtype, suffix in ((torch.bfloat16, "bf16"), (torch.float32, "f32")):
            functions = []
            for name, argtypes in signatures.items():
                fn = getattr(lib, f"{name}_{suffix}")
                fn.argtypes, fn.restype = argtypes, None
                functions.append(fn)
            kernels[dtype] = _Kernels(*functions)
        _kernels = kernels
        return _kernels


def _pool_forward(x: torch.Tensor, relu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled, one-byte argmax code per window) through the C kernel; with `relu`, ReLU of
    the pooled values, coded so that backward passes no gradient where it is zero."""
    n, c, h, w = x.shape
    forward = _kernels[x.dtype].pool_forward
    y = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
    code = torch.empty((n, h // 2, w // 2, c), dtype=torch.uint8)
    forward(
        x.data_ptr(), y.data_ptr(), code.data_ptr(), n, h, w, c, int(relu), torch.get_num_threads()
    )
    return y, code


class _MaxPool2x2(torch.autograd.Function):
    """Channels-last 2x2 max pooling (then ReLU, with `relu`) through the C kernel; the
    caller checked the input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        y, code = _pool_forward(x, relu)
        ctx.save_for_backward(code)
        ctx.input_shape = x.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (code,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        backward = _kernels[grad.dtype].pool_backward
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty((n, c, h, w), dtype=grad.dtype, memory_format=torch.channels_last)
        backward(
            grad.data_ptr(), code.data_ptr(), grad_x.data_ptr(), n, h, w, c, torch.get_num_threads()
        )
        return grad_x, None


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


# Hooks registered for every module (torch.nn.modules.module.register_module_*_hook)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")  # fmt: skip


def _hooked(*modules: nn.Module) -> bool:
    """Whether any hook would watch one of `modules` (forward or backward, its own or one
    registered for every module): a fused kernel runs the layers without calling them."""
    if any(getattr(torch.nn.modules.module, name, None) for name in _GLOBAL_HOOKS):
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in modules
    )


def pool_relu_applies(pool: nn.Module, relu: nn.Module, x: torch.Tensor) -> bool:
    """Whether `relu(pool(x))` may run as one `pool_relu` call: `MaxPool2x2` then ReLU,
    neither hooked, on an input the pooling kernel takes."""
    return (
        type(pool) is MaxPool2x2
        and type(relu) is nn.ReLU
        and not _hooked(pool, relu)
        and _kernel_applies(x)
    )


def pool_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(x, 2)) in one pass of the pooling kernel, the same values and
    gradients bit for bit; call only where `pool_relu_applies`."""
    if x.requires_grad and torch.is_grad_enabled():
        return _MaxPool2x2.apply(x, True)
    return _pool_forward(x, True)[0]


# Widths of the first stage's kernel: whole vectors of 8 channels, at most 8 of them, and
# rows of at most 64 pixels (its buffers live on the stack).
_STAGE_MAX_CHANNELS, _STAGE_MAX_WIDTH = 64, 64


def first_stage_applies(conv: nn.Module, pool: nn.Module, relu: nn.Module, x: torch.Tensor) -> bool:
    """Whether `relu(pool(conv(x)))` may run as one `first_stage` call: a real float32 CPU
    image batch [N,1,H,W] that needs no gradient itself, through Conv2d(1, C, 3,
    padding=1) with bias, C a multiple of 8 up to 64, `MaxPool2x2` and ReLU, none of them
    hooked, in float32 or under bfloat16 autocast."""
    if not (
        type(conv) is nn.Conv2d
        and type(pool) is MaxPool2x2
        and type(relu) is nn.ReLU
        and not _hooked(conv, pool, relu)
        and _kernel_applies(x)  # what every kernel asks of its input and of this process
    ):
        return False
    weight, bias = conv.weight, conv.bias
    autocast = torch.is_autocast_enabled("cpu")
    return (
        x.dtype == torch.float32
        and x.shape[1] == 1
        and x.shape[3] <= _STAGE_MAX_WIDTH
        and not x.requires_grad
        and conv.in_channels == 1
        and conv.out_channels % 8 == 0
        and conv.out_channels <= _STAGE_MAX_CHANNELS
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and bias is not None
        and weight.dtype == bias.dtype == torch.float32
        and weight.device.type == bias.device.type == "cpu"
        and (not autocast or torch.get_autocast_dtype("cpu") == torch.bfloat16)
    )


def _first_stage_forward(x, weight, bias, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, one-byte code per window) of the first stage through the C kernel."""
    x, weight, bias = x.contiguous(), weight.detach().contiguous(), bias.detach().contiguous()
    n, _, h, w = x.shape
    c = weight.shape[0]
    y = torch.empty((n, c, h // 2, w // 2), dtype=dtype, memory_format=torch.channels_last)
    code = torch.empty((n, h // 2, w // 2, c), dtype=torch.uint8)
    _kernels[dtype].stage_forward(
        x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), code.data_ptr(),
        n, h, w, c, torch.get_num_threads(),
    )  # fmt: skip
    return y, code


class _FirstStage(torch.autograd.Function):
    """relu(max_pool2d(conv2d(x, weight, bias, padding=1), 2)) through the C kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        y, code = _first_stage_forward(x, weight, bias, dtype)
        ctx.save_for_backward(x.contiguous(), code)
        ctx.dtype = dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, code = ctx.saved_tensors
        n, _, h, w = x.shape
        c = code.shape[3]
        grad = grad.to(ctx.dtype).contiguous(memory_format=torch.channels_last)
        parts = torch.get_num_threads()
        partial = torch.empty((parts, 10, c), dtype=torch.float32)
        _kernels[ctx.dtype].stage_backward(
            x.data_ptr(), grad.data_ptr(), code.data_ptr(), partial.data_ptr(), n, h, w, c, parts
        )
        sums = partial.sum(0)  # in part order: the same sum for the same thread count
        if ctx.dtype == torch.bfloat16:  # as autocast's bf16 weight and bias would get it
            sums = sums.to(torch.bfloat16).float()
        return None, sums[:9].t().reshape(c, 1, 3, 3), sums[9].clone(), None


def first_stage(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(conv(x), 2)) in one pass; call only where `first_stage_applies`.
    Returns channels-last float32, or bfloat16 under autocast."""
    dtype = torch.bfloat16 if torch.is_autocast_enabled("cpu") else torch.float32
    wanted = conv.weight.requires_grad or conv.bias.requires_grad
    if torch.is_grad_enabled() and wanted:
        return _FirstStage.apply(x, conv.weight, conv.bias, dtype)
    return _first_stage_forward(x, conv.weight, conv.bias, dtype)[0]


# BatchNorm's channels in the BatchNorm-pooling kernel: whole vectors of 8, at most 128 of
# them (its per-channel buffers live on the stack).
_NORM_MAX_CHANNELS = 1024


def norm_pool_relu_applies(
    norm: nn.Module, pool: nn.Module, relu: nn.Module, x: torch.Tensor
) -> bool:
    """Whether `relu(pool(norm(x)))` may run as one `norm_pool_relu` call: BatchNorm2d with
    its weight and bias (and running statistics, where it has them) float32 on the CPU, on
    a multiple of 8 channels up to 1024, `MaxPool2x2` and ReLU, none hooked, on an input
    the pooling kernel takes (at least 2x2, so more than one value per channel, as
    BatchNorm needs in training)."""
    if not (
        type(norm) is nn.BatchNorm2d
        and type(pool) is MaxPool2x2
        and type(relu) is nn.ReLU
        and not _hooked(norm, pool, relu)
        and _kernel_applies(x)
    ):
        return False
    c = x.shape[1]
    tensors = [norm.weight, norm.bias]
    if norm.running_mean is not None or norm.running_var is not None:
        tensors += [norm.running_mean, norm.running_var]
    return (
        norm.affine
        and c == norm.num_features
        and c % 8 == 0
        and c <= _NORM_MAX_CHANNELS
        and all(
            t is not None and t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors
        )
    )


def _uses_batch_statistics(norm: nn.BatchNorm2d) -> bool:
    return norm.training or norm.running_mean is None


def _count_batch(norm: nn.BatchNorm2d) -> float:
    """Counts this batch in `num_batches_tracked` where `nn.BatchNorm2d` would, and returns
    its weight in the running statistics, as BatchNorm computes it."""
    norm.num_batches_tracked.add_(1)
    if norm.momentum is None:  # a cumulative average
        return 1.0 / float(norm.num_batches_tracked)
    return norm.momentum


def _norm_pool_forward(norm: nn.BatchNorm2d, x: torch.Tensor):
    """(output, code, mean, 1/std) of BatchNorm -> 2x2 max pooling -> ReLU through the C
    kernel. As `nn.BatchNorm2d` does: batch statistics in training (or without running
    ones), the running ones updated in training where it tracks them, the running ones
    used in evaluation."""
    n, c, h, w = x.shape
    train = _uses_batch_statistics(norm)
    # the running statistics the kernel reads (evaluation) or updates (training)
    running = not norm.training or norm.track_running_stats
    running = running and norm.running_mean is not None
    momentum = _count_batch(norm) if train and running else 0.0
    y = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
    code = torch.empty((n, h // 2, w // 2, c), dtype=torch.uint8)
    part = torch.empty((n, 2, c), dtype=torch.float32) if train else None
    mean = torch.empty(c, dtype=torch.float32)
    rstd = torch.empty(c, dtype=torch.float32)
    _kernels[x.dtype].norm_forward(
        x.data_ptr(), norm.weight.data_ptr(), norm.bias.data_ptr(),
        norm.running_mean.data_ptr() if running else None,
        norm.running_var.data_ptr() if running else None,
        momentum, norm.eps, int(train), part.data_ptr() if train else None,
        mean.data_ptr(), rstd.data_ptr(), y.data_ptr(), code.data_ptr(),
        n, h, w, c, torch.get_num_threads(),
    )  # fmt: skip
    return y, code, mean, rstd


class _NormPoolReLU(torch.autograd.Function):
    """relu(max_pool2d(batch_norm(x), 2)) through the C kernel (once differentiable, as
    `MaxPool2x2` is: no gradients of gradients)."""

    @staticmethod
    def forward(ctx, x, weight, bias, norm):
        ctx.train = _uses_batch_statistics(norm)
        y, code, mean, rstd = _norm_pool_forward(norm, x)
        ctx.save_for_backward(x, code, weight, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, code, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        grad_weight = torch.empty(c, dtype=torch.float32)
        grad_bias = torch.empty(c, dtype=torch.float32)
        part = torch.empty((n, 2, c), dtype=torch.float32)
        _kernels[x.dtype].norm_backward(
            x.data_ptr(), grad.data_ptr(), code.data_ptr(), weight.data_ptr(), mean.data_ptr(),
            rstd.data_ptr(), int(ctx.train), part.data_ptr(), grad_weight.data_ptr(),
            grad_bias.data_ptr(), grad_x.data_ptr(), n, h, w, c, torch.get_num_threads(),
        )  # fmt: skip
        return grad_x, grad_weight, grad_bias, None


def norm_pool_relu(norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(norm(x), 2)) in one pass, running statistics updated as `norm`
    would; call only where `norm_pool_relu_applies`."""
    wanted = x.requires_grad or norm.weight.requires_grad or norm.bias.requires_grad
    if torch.is_grad_enabled() and wanted:
        return _NormPoolReLU.apply(x, norm.weight, norm.bias, norm)
    with torch.no_grad():
        return _norm_pool_forward(norm, x)[0]
