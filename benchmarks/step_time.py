"""Seconds per epoch of the seed network under each speed trick, from median step times.

Each variant trains a fresh seed network on random uint8 images for a fixed number of
steps (batch 128) and reports the median step time times the steps of one epoch (the best
of `--rounds`). The variants train side by side in one process, a step of each in turn,
so they share the machine's state, load that comes and goes included. The figures are for
comparing tricks with one another, not for quoting. In float32 every variant runs
without autocast and the bf16 row is left out.

    python benchmarks/step_time.py [--steps 150] [--rounds 2] [--precision fp32 bf16]
    python benchmarks/step_time.py --model fast [--steps 150] [--precision fp32 bf16]
    python benchmarks/step_time.py --layers [--precision fp32 bf16] [--model deep-bn]

With `--model` alone, the variants are a registered network as `fit` trains it
(channels-last, fused Adam) with the C kernels of `ConvNet` switched on one after another.

`--layers` says where the time of one training step goes instead: each layer of the seed
network (or of `--model`), as `fit` builds it (channels-last, ReLU after pooling, the pooling
kernel), timed alone, forward and backward, beside its floating-point operations per epoch and the
physical bound those set: FLOPs over the peak of a large matrix product in the same
precision on the same threads, measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import time

import torch
import torch.nn.functional as F
from measure import median_seconds
from torch import nn

from mnist_cnn import models
from mnist_cnn.models import MODELS, ConvNet, build_model
from mnist_cnn.pool import NATIVE_ENV, MaxPool2x2, kernel_status

EPOCH_IMAGES = 60_000
BATCH = 128

# name: (ReLU after pooling, channels-last, bf16 autocast, fused Adam, pooling kernel,
#        ReLU in the pooling kernel, first stage in one kernel)
VARIANTS = {
    "plain (NCHW, fp32, ReLU then pool)": (False, False, False, False, False, False, False),
    "+ channels-last": (False, True, False, False, False, False, False),
    "+ bf16 autocast": (False, True, True, False, False, False, False),
    "+ fused Adam": (False, True, True, True, False, False, False),
    "+ ReLU after pooling": (True, True, True, True, False, False, False),
    "+ compiled pooling kernel": (True, True, True, True, True, False, False),
    "+ ReLU in the pooling kernel": (True, True, True, True, True, True, False),
    "+ first stage in one kernel (all tricks)": (True, True, True, True, True, True, True),
}


class _ReLU(nn.ReLU):
    """ReLU that `ConvNet` does not fold into the pooling before it (a variant without)."""


class _Conv2d(nn.Conv2d):
    """A convolution that `ConvNet` does not fuse into a first stage (a variant without)."""


def seed_network(relu_after_pool: bool, pooling_kernel: bool, pool_relu: bool,
                 fused_stage: bool) -> nn.Module:  # fmt: skip
    def stage(c_in: int, c_out: int) -> list[nn.Module]:
        conv = (nn.Conv2d if fused_stage else _Conv2d)(c_in, c_out, 3, padding=1)
        relu = nn.ReLU(True) if pool_relu else _ReLU(True)
        pool = MaxPool2x2() if pooling_kernel else nn.MaxPool2d(2)
        return [conv, pool, relu] if relu_after_pool else [conv, relu, pool]

    return ConvNet(*stage(1, 16), *stage(16, 32), *stage(32, 32), nn.Flatten(),
                   nn.Linear(288, 10))  # fmt: skip


def _trainer(variant: tuple[bool, ...], precision: str):
    """A fresh seed network in `variant`'s form, and a function running its training step
    on batch `step` of (images, labels)."""
    relu_after_pool, channels_last, bf16, fused, pooling_kernel, pool_relu, fused_stage = variant
    bf16 = bf16 and precision == "bf16"
    torch.manual_seed(0)
    model = seed_network(relu_after_pool, pooling_kernel, pool_relu, fused_stage)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    return _step_function(model, optimizer, layout, bf16)


def _step_function(model, optimizer, layout, bf16: bool, within=contextlib.nullcontext):
    """The training step of `model` on batch `step` of (images, labels), its forward run
    within the context `within()` makes."""

    def train_step(images: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        batch = slice(step * BATCH, (step + 1) * BATCH)
        x = images[batch].unsqueeze(1).float().div_(255).contiguous(memory_format=layout)
        with within(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step


# name: (the pooling kernel with ReLU in it, the first stage in one kernel, BatchNorm stages
#        in one kernel)
KERNEL_VARIANTS = {
    "PyTorch's layers": (False, False, False),
    "+ pooling kernel, ReLU in it": (True, False, False),
    "+ first stage in one kernel": (True, True, False),
    "+ BatchNorm, pooling and ReLU in one kernel": (True, True, True),
}


class _Kernels:
    """Within it, `ConvNet` uses only the kernels a variant of KERNEL_VARIANTS switches on
    (without the pooling kernel, none: PyTorch's layers throughout)."""

    def __init__(self, pooling: bool, stage: bool, norm: bool):
        self.native = not pooling
        self.off = [name for name, on in (("first_stage_applies", stage),
                                          ("norm_pool_relu_applies", norm)) if not on]  # fmt: skip

    def __enter__(self):
        self.saved = {name: getattr(models, name) for name in self.off}
        for name in self.off:
            setattr(models, name, _never)
        if self.native:
            os.environ[NATIVE_ENV] = "1"

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(models, name, original)
        if self.native:
            del os.environ[NATIVE_ENV]


def _never(*args) -> bool:
    return False


def _model_trainer(model_name: str, variant: tuple[bool, ...], precision: str):
    """A fresh `model_name` network as `fit` trains it, and its training step on batch
    `step`, with the kernels `variant` switches on."""
    torch.manual_seed(0)
    model = build_model(model_name).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    return _step_function(model, optimizer, torch.channels_last, precision == "bf16",
                          lambda: _Kernels(*variant))  # fmt: skip


def kernel_variants(model_name: str) -> dict[str, tuple[bool, ...]]:
    """The rows of KERNEL_VARIANTS that change something in `model_name`."""
    layers = [type(m) for m in build_model(model_name).modules()]
    has = {"first stage": layers[1:3] == [nn.Conv2d, MaxPool2x2],
           "BatchNorm": any(a is nn.BatchNorm2d and b is MaxPool2x2
                            for a, b in itertools.pairwise(layers))}  # fmt: skip
    return {name: variant for name, variant in KERNEL_VARIANTS.items()
            if not any(word in name and not found for word, found in has.items())}  # fmt: skip


def seconds_per_epoch(trainers: dict, steps: int) -> dict[str, float]:
    """Each trainer's median step time times the steps of an epoch. The trainers run side
    by side: step i of each runs before step i + 1 of any, in an order that reverses every
    step, so load that comes and goes falls on all of them alike."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (steps * BATCH, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (steps * BATCH,))
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for step in range(steps):
        order = list(trainers) if step % 2 == 0 else list(reversed(trainers))
        for name in order:
            tick = time.perf_counter()
            trainers[name](images, labels, step)
            times[name].append(time.perf_counter() - tick)
    # the first steps pay for oneDNN's kernel selection
    return {name: statistics.median(t[steps // 4 :]) * EPOCH_IMAGES / BATCH
            for name, t in times.items()}  # fmt: skip


def _median_seconds(run, repeats: int) -> float:
    for _ in range(max(2, repeats // 5)):  # oneDNN picks its kernels on the first calls
        run()
    return median_seconds(run, repeats)


def peak_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a square matrix product: the most these cores do in this precision."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / _median_seconds(lambda: a @ b, repeats)


def flops_of(run) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def _forward_and_backward(layer: nn.Module, x: torch.Tensor, first: bool, bf16: bool):
    """Closures running `layer` forward, and forward then backward, as training does."""

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return layer(x.clone() if isinstance(layer, nn.ReLU) else x)

    out = forward()
    grad = torch.randn_like(out)
    wrt = [*layer.parameters()] + ([] if first else [x])

    def backward():
        out = forward()
        if wrt:
            out.backward(grad)
            for tensor in wrt:
                tensor.grad = None

    return forward, backward


def layer_table(precision: str, repeats: int, model_name: str = "seed") -> list[dict]:
    """Each layer of a sequential network alone: forward and backward seconds and FLOPs per
    epoch (469 batches of 128), in the layout and arithmetic `fit` trains with."""
    bf16 = precision == "bf16"
    torch.manual_seed(0)
    model = build_model(model_name)
    model = getattr(model, "net", model)  # a test-time wrapper trains its inner network
    if not isinstance(model, nn.Sequential):
        raise SystemExit(f"--layers times the layers of a sequential network; {model_name} is not")
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(BATCH, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    steps = EPOCH_IMAGES / BATCH
    # The layers as `fit` runs them: where `ConvNet` fuses layers, they are timed as one
    layers: list[tuple[str, nn.Module]] = []
    i, probe = 0, x
    while i < len(model):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.no_grad():
            width = model.group(i, probe) if isinstance(model, ConvNet) else 1
            group = model[i : i + width]
            probe = group(probe)
        position = f"{i}-{i + width - 1}" if width > 1 else str(i)
        layers.append((position, group if width > 1 else model[i]))
        i += width
    rows = []
    learned = False  # whether a layer before this one has parameters
    for position, layer in layers:
        # The image needs no gradient, nor does anything computed from it by layers without
        # parameters (a crop): the first stage's kernel takes only such an input
        first = not learned
        learned = learned or any(p.requires_grad for p in layer.parameters())
        x = x.detach().requires_grad_(not first)
        forward, backward = _forward_and_backward(layer, x, first, bf16)
        out = forward()
        # FLOPs of the plain layers: the counter cannot see into the kernel, whose
        # arithmetic is theirs
        counted = nn.Sequential(*layer) if isinstance(layer, ConvNet) else layer
        counted_forward, counted_backward = _forward_and_backward(counted, x, first, bf16)
        fwd = _median_seconds(forward, repeats)
        both = _median_seconds(backward, repeats)
        name = type(layer).__name__
        if isinstance(layer, nn.Conv2d):
            name = f"Conv2d {layer.in_channels}->{layer.out_channels}"
        if isinstance(layer, ConvNet):
            name = {nn.Conv2d: "Conv2d 1->{} + pool + ReLU in one kernel",
                    nn.BatchNorm2d: "BatchNorm2d + MaxPool2x2 + ReLU in one pass",
                    MaxPool2x2: "MaxPool2x2 + ReLU in one pass"}[type(layer[0])]  # fmt: skip
            name = name.format(getattr(layer[0], "out_channels", ""))
        rows.append({
            "layer": f"{position}: {name} {tuple(out.shape[1:])}",
            "forward_s": fwd * steps, "backward_s": max(both - fwd, 0.0) * steps,
            "forward_flops": flops_of(counted_forward) * steps,
            "backward_flops": (flops_of(counted_backward) - flops_of(counted_forward)) * steps,
        })  # fmt: skip
        x = out.detach()
    return rows


def print_layers(precisions: list[str], repeats: int, model_name: str = "seed") -> None:
    for precision in precisions:
        peak = peak_flops(torch.bfloat16 if precision == "bf16" else torch.float32)
        rows = layer_table(precision, repeats, model_name)
        print(f"\n{model_name}, {precision}: peak of a 2048x2048 matrix product "
              f"{peak / 1e9:.0f} GFLOP/s on {torch.get_num_threads()} threads; "
              "seconds and GFLOP per epoch (469 batches of 128)\n")  # fmt: skip
        print("| layer | forward s | backward s | GFLOP fwd + bwd | bound s | time / bound |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        total_s = total_flops = 0.0
        for row in rows:
            seconds = row["forward_s"] + row["backward_s"]
            flops = row["forward_flops"] + row["backward_flops"]
            total_s, total_flops = total_s + seconds, total_flops + flops
            ratio = f"{seconds / (flops / peak):.1f}" if flops else ""
            print(f"| {row['layer']} | {row['forward_s']:.3f} | {row['backward_s']:.3f} | "
                  f"{flops / 1e9:.1f} | {flops / peak:.3f} | {ratio} |")  # fmt: skip
        print(f"| all layers | | | {total_flops / 1e9:.1f} | {total_flops / peak:.3f} | "
              f"{total_s / (total_flops / peak):.1f} |\n\nsum of the layers' seconds: "
              f"{total_s:.2f} per epoch")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", action="store_true", help="time each layer instead")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"],
                        choices=["fp32", "bf16"])  # fmt: skip
    parser.add_argument("--model", choices=sorted(MODELS),
                        help="the network whose layers (--layers) or kernels to time")  # fmt: skip
    args = parser.parse_args()
    if args.layers:
        print_layers(args.precision, args.steps, args.model or "seed")
        return
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, kernels: "
          f"{kernel_status()}" + (f", network {args.model}" if args.model else ""))  # fmt: skip
    for precision in args.precision:
        if args.model:
            variants = kernel_variants(args.model)
        else:
            variants = {name: variant for name, variant in VARIANTS.items()
                        if precision == "bf16" or "bf16" not in name}  # fmt: skip
        results: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            if args.model:
                trainers = {name: _model_trainer(args.model, variant, precision)
                            for name, variant in variants.items()}  # fmt: skip
            else:
                trainers = {name: _trainer(variant, precision)
                            for name, variant in variants.items()}  # fmt: skip
            for name, seconds in seconds_per_epoch(trainers, args.steps).items():
                results[name].append(seconds)
        print(f"\n{precision}\n\n| variant | seconds per epoch (best round) |\n| --- | ---: |")
        for name, values in results.items():
            print(f"| {name} | {min(values):.2f} |")


if __name__ == "__main__":
    main()
