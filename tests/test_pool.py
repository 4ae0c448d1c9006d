"""The compiled 2x2 max pooling: bit-identical to PyTorch's, used only where it applies."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mnist_cnn import build_model, pool
from mnist_cnn.metrics import predict_logits
from mnist_cnn.pool import MaxPool2x2

HAS_COMPILER = bool(shutil.which("cc") or shutil.which("gcc"))
needs_kernel = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _pool_both_ways(x: torch.Tensor, grad: torch.Tensor):
    """(output, input gradient) from PyTorch's pooling and from the kernel."""
    native_in = x.clone().requires_grad_()
    kernel_in = x.clone().requires_grad_()
    native_out = F.max_pool2d(native_in, 2)
    kernel_out = pool._MaxPool2x2.apply(kernel_in)
    native_out.backward(grad)
    kernel_out.backward(grad)
    return (native_out, native_in.grad), (kernel_out, kernel_in.grad)


def _assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@needs_kernel
def test_the_kernel_compiles_where_there_is_a_compiler():
    assert pool.kernel_status() == "compiled"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 16, 28, 28), (3, 32, 7, 7), (2, 5, 5, 6), (1, 3, 2, 2)])
def test_values_and_gradients_equal_pytorch_ties_nan_and_odd_sizes(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[:, :, :2, :2] = 0.5  # a tied window: the first maximum in row-major order wins
    x[:, :, -2:, -2:] = 0.0
    x[0, 0, -2, -1] = -0.0  # -0 and +0 tie as well
    x[0, -1, 0, 1] = float("nan")  # NaN wins its window
    x = _channels_last(x.to(dtype))
    grad = _channels_last(torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2).to(dtype))
    (native_out, native_grad), (kernel_out, kernel_grad) = _pool_both_ways(x, grad)
    _assert_bitwise_equal(kernel_out, native_out)
    _assert_bitwise_equal(kernel_grad, native_grad)
    assert kernel_out.is_contiguous(memory_format=torch.channels_last)
    assert kernel_grad.is_contiguous(memory_format=torch.channels_last)


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 9),
    h=st.integers(2, 9),
    w=st.integers(2, 9),
    levels=st.integers(1, 4),  # few distinct values: many ties
    seed=st.integers(0, 2**31 - 1),
)
def test_any_small_shape_with_many_ties_matches_pytorch(n, c, h, w, levels, seed):
    generator = torch.Generator().manual_seed(seed)
    x = _channels_last(torch.randint(-levels, levels + 1, (n, c, h, w), generator=generator))
    x = x.to(torch.bfloat16)
    grad = _channels_last(torch.randn(n, c, h // 2, w // 2, generator=generator))
    (native_out, native_grad), (kernel_out, kernel_grad) = _pool_both_ways(
        x, grad.to(torch.bfloat16)
    )
    _assert_bitwise_equal(kernel_out, native_out)
    _assert_bitwise_equal(kernel_grad, native_grad)


@needs_kernel
def test_the_kernel_runs_for_channels_last_cpu_tensors_only():
    layer = MaxPool2x2()
    x = _channels_last(torch.randn(2, 4, 6, 6)).requires_grad_()
    assert type(layer(x).grad_fn).__name__ == "_MaxPool2x2Backward"
    with torch.no_grad():
        assert layer(x).grad_fn is None
    nchw = torch.randn(2, 4, 6, 6, requires_grad=True)  # not channels-last: PyTorch's pooling
    assert type(layer(nchw).grad_fn).__name__ == "MaxPool2DWithIndicesBackward0"


@needs_kernel
def test_evaluation_uses_the_kernel_and_gives_pytorchs_logits(monkeypatch):
    calls = []
    kernel_forward = pool._pool_forward
    monkeypatch.setattr(pool, "_pool_forward", lambda x: calls.append(x.shape) or kernel_forward(x))
    torch.manual_seed(0)
    model = build_model("seed").to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (37, 28, 28), dtype=torch.uint8)
    with_kernel = predict_logits(model, images)
    assert [tuple(shape) for shape in calls] == [(37, 16, 28, 28), (37, 32, 14, 14), (37, 32, 7, 7)]
    monkeypatch.setenv(pool.NATIVE_ENV, "1")
    assert torch.equal(predict_logits(model, images), with_kernel)
    assert len(calls) == 3


@needs_kernel
def test_native_pool_env_switches_the_kernel_off(monkeypatch):
    monkeypatch.setenv(pool.NATIVE_ENV, "1")
    x = _channels_last(torch.randn(2, 4, 6, 6)).requires_grad_()
    assert type(MaxPool2x2()(x).grad_fn).__name__ != "_MaxPool2x2Backward"
    assert pool.kernel_status() == f"pytorch ({pool.NATIVE_ENV} is set)"


@needs_kernel
@pytest.mark.parametrize("name", ["seed", "fast", "deep-bn"])
def test_training_steps_are_bit_identical_with_and_without_the_kernel(name, monkeypatch):
    """Same data, same steps: the weights agree exactly, so the kernel changes no result."""
    torch.manual_seed(1)
    images = _channels_last(torch.rand(64, 1, 28, 28))
    labels = torch.randint(0, 10, (64,))
    weights = {}
    for native in ("1", ""):
        monkeypatch.setenv(pool.NATIVE_ENV, native)
        torch.manual_seed(0)
        model = build_model(name).to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(4):
            batch = slice(16 * step, 16 * step + 16)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(images[batch])
            loss = F.cross_entropy(logits.float(), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        weights[native] = [p.detach().clone() for p in model.parameters()]
    for with_kernel, without in zip(weights[""], weights["1"], strict=True):
        assert torch.equal(with_kernel, without)


def test_without_a_compiler_pooling_falls_back_to_pytorch(tmp_path):
    """A fresh process whose compiler fails still trains, with PyTorch's pooling."""
    code = (
        "import torch\n"
        "from mnist_cnn import pool\n"
        "status = pool.kernel_status()\n"
        "x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)\n"
        "x.requires_grad_()\n"
        "y = pool.MaxPool2x2()(x)\n"
        "y.sum().backward()\n"
        "assert torch.equal(y, torch.nn.functional.max_pool2d(x, 2))\n"
        "print(status)\n"
        "print(type(y.grad_fn).__name__)\n"
    )
    env = {"CC": "/bin/false", "MNIST_CNN_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    status, grad_fn = done.stdout.strip().splitlines()
    assert status.startswith("pytorch (pooling kernel unavailable: /bin/false failed")
    assert grad_fn == "MaxPool2DWithIndicesBackward0"
    assert not list((tmp_path / "kernels").glob("*.so"))
