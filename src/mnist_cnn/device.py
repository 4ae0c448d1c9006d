"""Where and in what arithmetic training runs: device, precision, CPU threads, autocast."""

from __future__ import annotations

import contextlib
import os

import torch

from mnist_cnn.cpu import cpu_flags
from mnist_cnn.distributed import World
from mnist_cnn.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{name}': use auto, cpu or cuda")
    return torch.device(name)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_cpu_threads(threads: int | None, processes_on_this_machine: int = 1) -> int:
    """Use `threads` CPU threads (None: this process's share of the cores it may use)."""
    torch.set_num_threads(threads or max(1, available_cores() // processes_on_this_machine))
    return torch.get_num_threads()


def training_device(name: str, world: World, threads: int | None = None) -> torch.device:
    """The device this process trains on: under torchrun, each process its own GPU, or
    its share of the CPU's cores (`threads` overrides)."""
    device = select_device(name)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cpu":
        set_cpu_threads(threads, world.local_size)
    return device


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls and convolutions run natively on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` means bf16 where the hardware has it natively, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if has_fast_bf16(device) else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in: bf16 autocast (convolutions and the dense layer
    in bfloat16, loss and weights in float32: 2.61 -> 1.98 s per seed epoch with
    avx512_bf16, benchmarks/step_time.py), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU kernels, so that they count in the time just measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
