"""Seconds per epoch of the seed network under each speed trick, from median step times.

Each variant trains a fresh seed network on random uint8 images for a fixed number of
steps (batch 128, fused Adam) and reports the median step time times the steps of one
epoch; variants are measured in turn, twice round, in one process, so they share the
machine's state. The figures are for comparing tricks with one another, not for quoting.

    python benchmarks/step_time.py [--steps 150] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.pool import MaxPool2x2, kernel_status

EPOCH_IMAGES = 60_000
BATCH = 128

# name: (ReLU after pooling, channels-last, bf16 autocast, fused Adam, pooling kernel)
VARIANTS = {
    "plain (NCHW, fp32, ReLU then pool)": (False, False, False, False, False),
    "+ channels-last": (False, True, False, False, False),
    "+ bf16 autocast": (False, True, True, False, False),
    "+ fused Adam": (False, True, True, True, False),
    "+ ReLU after pooling": (True, True, True, True, False),
    "+ compiled pooling kernel (all tricks)": (True, True, True, True, True),
}


def seed_network(relu_after_pool: bool, pooling_kernel: bool) -> nn.Sequential:
    def stage(c_in: int, c_out: int) -> list[nn.Module]:
        conv, relu = nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(True)
        pool = MaxPool2x2() if pooling_kernel else nn.MaxPool2d(2)
        return [conv, pool, relu] if relu_after_pool else [conv, relu, pool]

    return nn.Sequential(*stage(1, 16), *stage(16, 32), *stage(32, 32), nn.Flatten(),
                         nn.Linear(288, 10))  # fmt: skip


def seconds_per_epoch(variant: tuple[bool, ...], steps: int) -> float:
    relu_after_pool, channels_last, bf16, fused, pooling_kernel = variant
    torch.manual_seed(0)
    images = torch.randint(0, 256, (steps * BATCH, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (steps * BATCH,))
    model = seed_network(relu_after_pool, pooling_kernel)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    times = []
    for step in range(steps):
        tick = time.perf_counter()
        batch = slice(step * BATCH, (step + 1) * BATCH)
        x = images[batch].unsqueeze(1).float().div_(255).contiguous(memory_format=layout)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - tick)
    warm = times[steps // 4 :]  # the first steps pay for oneDNN's kernel selection
    return statistics.median(warm) * EPOCH_IMAGES / BATCH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, variant in VARIANTS.items():
            results[name].append(seconds_per_epoch(variant, args.steps))
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, pooling kernel: "
          f"{kernel_status()}")  # fmt: skip
    print("| variant | seconds per epoch (best round) |\n| --- | ---: |")
    for name, values in results.items():
        print(f"| {name} | {min(values):.2f} |")


if __name__ == "__main__":
    main()
