"""The compiled kernels: 2x2 max pooling bit-identical to PyTorch's; the fused first stage
(conv, pooling, ReLU) and BatchNorm stages (BatchNorm, pooling, ReLU) equal to the plain
layers up to float rounding; each used only where it applies."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mnist_cnn import build_model, pool
from mnist_cnn.metrics import predict_logits
from mnist_cnn.models import ConvNet
from mnist_cnn.pool import MaxPool2x2

HAS_COMPILER = bool(shutil.which("cc") or shutil.which("gcc"))
needs_kernel = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _count_calls(monkeypatch, name: str) -> list:
    """A list that gains an item at each call of `pool.<name>`, which still runs."""
    calls = []
    kernel = getattr(pool, name)
    monkeypatch.setattr(pool, name, lambda *args: calls.append(1) or kernel(*args))
    return calls


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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 32, 14, 14), (3, 8, 7, 7), (2, 5, 5, 6)])
def test_pooling_then_relu_in_one_pass_equals_pytorch_bit_for_bit(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[:, :, :2, :2] = 0.0  # a window whose maximum is zero: ReLU passes no gradient
    x[0, 0, 2:4, 2:4] = -0.0  # -0 stays -0, as torch.relu keeps it
    x[0, -1, 0, 1] = float("nan")  # NaN wins its window and passes ReLU
    x = _channels_last(x.to(dtype))
    grad = _channels_last(torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2))
    native_in, kernel_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    native_out = torch.relu(F.max_pool2d(native_in, 2))
    kernel_out = pool.pool_relu(kernel_in)
    native_out.backward(grad.to(dtype))
    kernel_out.backward(grad.to(dtype))
    _assert_bitwise_equal(kernel_out, native_out)
    _assert_bitwise_equal(kernel_in.grad, native_in.grad)
    with torch.no_grad():
        _assert_bitwise_equal(pool.pool_relu(x), native_out.detach())


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
def test_evaluation_uses_the_kernels_and_gives_pytorchs_logits(monkeypatch):
    calls = []
    pool_forward, stage_forward = pool._pool_forward, pool._first_stage_forward
    monkeypatch.setattr(
        pool, "_pool_forward", lambda x, relu=False: calls.append(x.shape) or pool_forward(x, relu)
    )
    monkeypatch.setattr(
        pool, "_first_stage_forward", lambda x, *a: calls.append(x.shape) or stage_forward(x, *a)
    )
    torch.manual_seed(0)
    model = build_model("seed").to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (37, 28, 28), dtype=torch.uint8)
    with_kernels = predict_logits(model, images)
    assert [tuple(shape) for shape in calls] == [(37, 1, 28, 28), (37, 32, 14, 14), (37, 32, 7, 7)]
    monkeypatch.setenv(pool.NATIVE_ENV, "1")
    native = predict_logits(model, images)
    assert len(calls) == 3
    # the first stage's sums in another order: float rounding, the same answers
    torch.testing.assert_close(with_kernels, native, rtol=1e-5, atol=1e-5)
    assert torch.equal(with_kernels.argmax(1), native.argmax(1))


@needs_kernel
def test_native_pool_env_switches_the_kernel_off(monkeypatch):
    monkeypatch.setenv(pool.NATIVE_ENV, "1")
    x = _channels_last(torch.randn(2, 4, 6, 6)).requires_grad_()
    assert type(MaxPool2x2()(x).grad_fn).__name__ != "_MaxPool2x2Backward"
    assert pool.kernel_status() == f"pytorch ({pool.NATIVE_ENV} is set)"


def _train_four_steps(name: str, bf16: bool = True) -> list[torch.Tensor]:
    """The weights of `name` after four Adam steps (in bf16, or float32) on fixed random data."""
    torch.manual_seed(1)
    images = _channels_last(torch.rand(64, 1, 28, 28))
    labels = torch.randint(0, 10, (64,))
    torch.manual_seed(0)
    model = build_model(name).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(4):
        batch = slice(16 * step, 16 * step + 16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(images[batch])
        loss = F.cross_entropy(logits.float(), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@needs_kernel
@pytest.mark.parametrize("name", ["seed", "fast", "fast-24x24", "fast-28x24", "deep-bn"])
def test_training_steps_are_bit_identical_with_and_without_the_pooling_kernel(name, monkeypatch):
    """Same data, same steps: the weights agree exactly, so the pooling kernel changes no
    result. (The fused first stage and BatchNorm stages, which agree only to rounding, are
    held off here.)"""
    monkeypatch.setattr("mnist_cnn.models.first_stage_applies", lambda *args: False)
    monkeypatch.setattr("mnist_cnn.models.norm_pool_relu_applies", lambda *args: False)
    weights = {}
    for native in ("1", ""):
        monkeypatch.setenv(pool.NATIVE_ENV, native)
        weights[native] = _train_four_steps(name)
    for with_kernel, without in zip(weights[""], weights["1"], strict=True):
        assert torch.equal(with_kernel, without)


# --- the fused first stage: Conv2d(1, C, 3, padding=1) -> MaxPool2x2 -> ReLU -----------------


def _stage_both_ways(x, weight, bias, grad, bf16):
    """((output, weight grad, bias grad) of the plain layers, the same of the kernel)."""
    results = []
    for fused in (False, True):
        conv = nn.Conv2d(1, weight.shape[0], 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if fused:
                assert pool.first_stage_applies(conv, MaxPool2x2(), nn.ReLU(), x)
                out = pool.first_stage(conv, x)
            else:
                out = torch.relu(F.max_pool2d(conv(x), 2))
        out.backward(grad.to(out.dtype))
        results.append((out, conv.weight.grad, conv.bias.grad))
    return results


@needs_kernel
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("shape", [(5, 16, 28, 28), (3, 8, 7, 5), (2, 32, 2, 3), (1, 64, 9, 64)])
def test_first_stage_equals_conv_pool_relu_to_rounding(shape, bf16):
    n, c, h, w = shape
    torch.manual_seed(0)
    x = torch.rand(n, 1, h, w)
    weight, bias = torch.randn(c, 1, 3, 3), torch.randn(c) * 0.1
    grad = torch.randn(n, c, h // 2, w // 2)
    (plain, plain_w, plain_b), (fused, fused_w, fused_b) = _stage_both_ways(
        x, weight, bias, grad, bf16
    )
    assert fused.dtype == plain.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert fused.shape == plain.shape
    assert fused.is_contiguous(memory_format=torch.channels_last)
    # bf16 outputs are the same rounding of sums that differ only in float32 order
    torch.testing.assert_close(fused, plain, rtol=0.01 if bf16 else 1e-5, atol=1e-5)
    torch.testing.assert_close(fused_w, plain_w, rtol=0.01 if bf16 else 1e-5, atol=1e-4)
    torch.testing.assert_close(fused_b, plain_b, rtol=0.01 if bf16 else 1e-5, atol=1e-4)


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.sampled_from([8, 16, 24]),
    h=st.integers(2, 9),
    w=st.integers(2, 9),
    bf16=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_first_stage_ties_and_zeros_match_bit_for_bit(n, c, h, w, bf16, seed):
    """Small integers make every sum exact in any order: then values and gradients are
    bit-identical, ties (first maximum wins) and ReLU's zeros (no gradient) included."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (n, 1, h, w), generator=generator).float()
    weight = torch.randint(-2, 3, (c, 1, 3, 3), generator=generator).float()
    bias = torch.randint(-2, 3, (c,), generator=generator).float()
    grad = torch.randint(-3, 4, (n, c, h // 2, w // 2), generator=generator).float()
    (plain, plain_w, plain_b), (fused, fused_w, fused_b) = _stage_both_ways(
        x, weight, bias, grad, bf16
    )
    _assert_bitwise_equal(fused.float(), plain.float())
    _assert_bitwise_equal(fused_w, plain_w)
    _assert_bitwise_equal(fused_b, plain_b)


def _stage_with_one_pixel(image: int, row: int, col: int, value: float):
    """Both ways of a float32 first stage on random 6x6 images with one pixel set to `value`
    and a gradient of ones: ((plain, plain_w, plain_b), (fused, fused_w, fused_b))."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 6, 6)
    x[image, 0, row, col] = value
    weight, bias = torch.randn(8, 1, 3, 3), torch.zeros(8)
    return _stage_both_ways(x, weight, bias, torch.ones(2, 8, 3, 3), False)


@needs_kernel
def test_first_stage_passes_nan_on_as_the_plain_layers_do():
    (plain, plain_w, _), (fused, fused_w, _) = _stage_with_one_pixel(0, 2, 3, float("nan"))
    assert torch.equal(fused.isnan(), plain.isnan()) and fused.isnan().any()
    assert torch.equal(fused_w.isnan(), plain_w.isnan())


@needs_kernel
def test_first_stage_gradients_see_an_infinite_pixel_as_the_plain_layers_do():
    """An infinite pixel times a zero gradient (a position that is not its window's maximum,
    or a window ReLU zeroed) is NaN in the plain layers' weight gradients: the backward's
    one-pass path, which multiplies only the maxima's taps, must not take such a row."""
    (_, plain_w, plain_b), (_, fused_w, fused_b) = _stage_with_one_pixel(1, 3, 2, float("inf"))
    assert plain_w.isnan().any() and torch.equal(fused_w.isnan(), plain_w.isnan())
    assert torch.equal(fused_b.isnan(), plain_b.isnan())


@needs_kernel
def test_the_first_stage_kernel_runs_where_it_applies_and_nowhere_else(monkeypatch):
    calls = _count_calls(monkeypatch, "_first_stage_forward")
    torch.manual_seed(0)
    model = build_model("seed").to(memory_format=torch.channels_last)
    assert isinstance(model, ConvNet)
    x = torch.rand(4, 1, 28, 28)
    plain = nn.Sequential(*model)  # the same modules, run one by one
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x), plain(x))  # bf16: the same outputs here
    assert len(calls) == 1
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
    with torch.no_grad():  # evaluation
        model(x)
    assert len(calls) == 3
    model(x.clone().requires_grad_())  # a gradient wanted for the image
    hook = model[0].register_forward_hook(lambda *args: None)  # someone watches the conv
    model(x)
    hook.remove()
    with torch.autocast("cpu", dtype=torch.float16):  # not bf16
        model(x)
    monkeypatch.setenv(pool.NATIVE_ENV, "1")
    model(x)
    assert len(calls) == 3
    narrow = nn.Conv2d(1, 12, 3, padding=1)  # not whole vectors of 8 channels
    assert not pool.first_stage_applies(narrow, MaxPool2x2(), nn.ReLU(), x)
    wide = torch.rand(2, 1, 28, 65)  # rows longer than the kernel's buffers
    assert not pool.first_stage_applies(model[0], model[1], model[2], wide)


def test_the_first_stage_kernel_runs_on_the_centre_after_a_crop(monkeypatch):
    shapes = []
    kernel = pool._first_stage_forward
    monkeypatch.setattr(
        pool, "_first_stage_forward", lambda x, *a: shapes.append(tuple(x.shape)) or kernel(x, *a)
    )
    torch.manual_seed(0)
    model = build_model("fast-24x24").to(memory_format=torch.channels_last)
    x = torch.rand(4, 1, 28, 28)
    plain = nn.Sequential(*model)  # the same modules, run one by one
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain(x), rtol=1e-5, atol=1e-5)
    assert shapes == [(4, 1, 24, 24)] * 2  # training and evaluation, on the centre only


@needs_kernel
def test_the_networks_pool_and_relu_in_one_pass_unless_someone_watches(monkeypatch):
    calls = []
    kernel = pool._pool_forward
    monkeypatch.setattr(
        pool, "_pool_forward", lambda x, relu=False: calls.append(relu) or kernel(x, relu)
    )
    torch.manual_seed(0)
    model = build_model("seed").to(memory_format=torch.channels_last).eval()
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    logits = predict_logits(model, images)
    assert calls == [True, True]  # stages 2 and 3 (the first is a kernel of its own)
    hook = model[5].register_forward_hook(lambda *args: None)  # the second stage's ReLU
    assert torch.equal(predict_logits(model, images), logits)
    hook.remove()
    assert calls[2:] == [False, True]


@needs_kernel
@pytest.mark.parametrize("name", ["seed", "fast", "fast-24x24", "fast-28x24", "deep-bn"])
def test_training_steps_with_the_fused_stages_track_the_plain_layers(name, monkeypatch):
    """Four Adam steps: in float32 the fused stages give the plain layers' weights to
    rounding; in bf16 they land as near the float32 weights as the plain bf16 layers do.
    (bf16's rounding flips the sign of some small gradients, which Adam's first steps turn
    into a full step either way, so two bf16 runs that round differently drift apart by
    about as much as either is from float32.)"""
    weights = {}
    for native in ("1", ""):
        monkeypatch.setenv(pool.NATIVE_ENV, native)
        for bf16 in (False, True):
            weights[native, bf16] = _train_four_steps(name, bf16)
    for fused, plain in zip(weights["", False], weights["1", False], strict=True):
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-3)
    fused_gap = plain_gap = 0.0
    runs = weights["", True], weights["1", True], weights["1", False]
    for fused, plain, fp32 in zip(*runs, strict=True):
        fused_gap += (fused - fp32).abs().sum().item()
        plain_gap += (plain - fp32).abs().sum().item()
    assert fused_gap < 1.25 * plain_gap


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


# --- BatchNorm2d -> MaxPool2x2 -> ReLU in one pass ------------------------------------------


def _norm_both_ways(x, grad, bf16, train=True, **options):
    """[(output, input grad, weight grad, bias grad, running mean, running var, batches
    counted) of the plain layers, the same of the kernel], from one BatchNorm2d."""
    torch.manual_seed(5)
    norm = nn.BatchNorm2d(x.shape[1], **options)
    with torch.no_grad():
        norm.weight.uniform_(-1.0, 2.0)  # negative scales too: pooling takes the max after
        norm.bias.normal_()
        if norm.running_mean is not None:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    norm.train(train)
    results = []
    for fused in (False, True):
        layer = copy.deepcopy(norm)
        given = x.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            assert pool.norm_pool_relu_applies(layer, MaxPool2x2(), nn.ReLU(), given)
            if fused:
                out = pool.norm_pool_relu(layer, given)
            else:
                out = F.relu(F.max_pool2d(layer(given), 2))
        out.backward(grad.to(out.dtype))
        stats = [layer.running_mean, layer.running_var, layer.num_batches_tracked]
        results.append([out, given.grad, layer.weight.grad, layer.bias.grad, *stats])
    return results


def _assert_close_to_scale(a, b, relative):
    """Each element within `relative` of the largest magnitude in `b`."""
    if b is None:
        assert a is None
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    scale = b.float().abs().max().item() or 1.0
    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=relative * scale)


@needs_kernel
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(16, 32, 14, 14), (9, 32, 7, 7), (3, 8, 5, 9), (2, 64, 6, 6)])
def test_batchnorm_stage_matches_the_layers(shape, train, bf16):
    """Values, all three gradients and the running statistics of BatchNorm2d -> max pooling
    -> ReLU, with batch statistics (training) and running ones (evaluation), odd sizes
    included (their last row and column still count in the statistics and get gradients)."""
    torch.manual_seed(0)
    x = _channels_last(torch.randn(shape) * 3 + 1)
    if bf16:
        x = x.to(torch.bfloat16)
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    plain, fused = _norm_both_ways(x, grad, bf16, train)
    # bfloat16: a value that rounds the other way moves by one unit in the last place
    relative = 2e-2 if bf16 else 1e-5
    for a, b in zip(fused, plain, strict=True):
        _assert_close_to_scale(a, b, relative)
    assert fused[0].is_contiguous(memory_format=torch.channels_last)


@needs_kernel
@pytest.mark.parametrize("options", [{"momentum": None}, {"track_running_stats": False}])
def test_batchnorm_stage_keeps_pytorchs_other_statistics(options):
    """A cumulative average (momentum None) counts batches as BatchNorm does; without
    running statistics, evaluation uses the batch's own."""
    torch.manual_seed(0)
    x = _channels_last(torch.randn(4, 16, 6, 6))
    grad = torch.randn(4, 16, 3, 3)
    for train in (True, False):
        plain, fused = _norm_both_ways(x, grad, False, train, **options)
        for a, b in zip(fused, plain, strict=True):
            _assert_close_to_scale(a, b, 1e-5)


@needs_kernel
def test_batchnorm_stage_routes_ties_and_relu_zeros_as_the_layers_do():
    """Equal inputs normalise to equal values: the first of a window's equals takes the
    gradient, and a window whose maximum ReLU zeroes passes none, as in PyTorch."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, 8, 8)
    x[:, :, ::2, 1::2] = x[:, :, ::2, ::2]  # every window's top row ties
    x[:, :, 1::2, :] = x[:, :, ::2, :] - 5.0  # below it, less
    x = _channels_last(x)
    grad = torch.randn(6, 8, 4, 4)
    plain, fused = _norm_both_ways(x, grad, False)
    for a, b in zip(fused, plain, strict=True):
        _assert_close_to_scale(a, b, 1e-5)


@needs_kernel
def test_batchnorm_stage_gives_the_same_bits_on_any_number_of_threads():
    """Each image's sums, then the batch's in image order: the thread count changes no bit
    (bit-exact resumes on another machine's core count)."""
    torch.manual_seed(0)
    x = _channels_last(torch.randn(64, 32, 14, 14))
    grad = torch.randn(64, 32, 7, 7)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            results.append(_norm_both_ways(x, grad, False)[1])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@needs_kernel
def test_batchnorm_stage_runs_where_it_applies_and_nowhere_else(monkeypatch):
    calls = _count_calls(monkeypatch, "_norm_pool_forward")
    torch.manual_seed(0)
    model = build_model("fast").to(memory_format=torch.channels_last)
    x = _channels_last(torch.rand(4, 1, 28, 28))
    model(x).sum().backward()
    assert len(calls) == 2  # the second and third stages
    with torch.no_grad():
        model.eval()(x)
    assert len(calls) == 4
    hook = model[4].register_forward_hook(lambda *args: None)  # the second stage's BatchNorm
    model(x)
    assert len(calls) == 5
    hook.remove()
    x12 = _channels_last(torch.rand(2, 12, 4, 4))  # 12 channels: not whole vectors of 8
    assert not pool.norm_pool_relu_applies(nn.BatchNorm2d(12), MaxPool2x2(), nn.ReLU(), x12)
    plain = nn.BatchNorm2d(8, affine=False)  # no weight and bias
    x8 = _channels_last(torch.rand(2, 8, 4, 4))
    assert not pool.norm_pool_relu_applies(plain, MaxPool2x2(), nn.ReLU(), x8)
    monkeypatch.setenv(pool.NATIVE_ENV, "1")
    model.train()(x)
    assert len(calls) == 5


@needs_kernel
def test_batchnorm_stage_with_running_statistics_keeps_inf_and_nan_out_of_other_gradients():
    """With running statistics BatchNorm is a fixed affine map: an input's gradient is its
    own output gradient times the scale, whatever other inputs hold (inf * 0 is NaN)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5)
    x[0, 0, 0, 0] = float("inf")
    x[1, 3, 4, 4] = float("nan")  # in the last odd row and column: no window covers it
    x[0, 1, 2, 2] = float("nan")
    grad = torch.randn(2, 8, 2, 2)
    plain, fused = _norm_both_ways(_channels_last(x), grad, False, train=False)
    # output, input gradient, bias gradient (PyTorch's weight gradient sums zero gradients
    # times every input, so a NaN that no window reads makes its channel's NaN; the
    # kernel sums only what reaches the output)
    for a, b in zip([fused[i] for i in (0, 1, 3)], [plain[i] for i in (0, 1, 3)], strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


@needs_kernel
def test_batchnorm_stage_leaves_untracked_running_statistics_alone():
    """`track_running_stats` switched off after construction: training uses the batch's
    statistics and, as BatchNorm does, neither reads nor writes the buffers it keeps."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(8)
    norm.track_running_stats = False
    x = torch.randn(2, 8, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        pool.norm_pool_relu(norm, _channels_last(x))
    assert torch.equal(norm.running_mean, torch.zeros(8))
    assert torch.equal(norm.running_var, torch.ones(8))
    assert norm.num_batches_tracked.item() == 0


@needs_kernel
def test_backward_and_global_hooks_turn_the_fused_stages_off(monkeypatch):
    """A backward hook on a layer, or a hook registered for every module, must see the
    layers called one by one."""
    calls = _count_calls(monkeypatch, "_norm_pool_forward")
    torch.manual_seed(0)
    model = build_model("fast").to(memory_format=torch.channels_last)
    x = _channels_last(torch.rand(2, 1, 28, 28))
    fired = []
    hook = model[4].register_full_backward_hook(lambda *args: fired.append(1))
    model(x).sum().backward()
    hook.remove()
    assert fired == [1] and len(calls) == 1  # the third stage still fused
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(type(module).__name__)
    )
    try:
        model(x)
    finally:
        hook.remove()
    assert seen.count("BatchNorm2d") == 2 and seen.count("MaxPool2x2") == 3
    assert len(calls) == 1
