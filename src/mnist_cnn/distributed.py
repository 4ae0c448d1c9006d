"""Data-parallel training across processes started by `torchrun` (PyTorch's own engine).

Every rank walks the same seeded per-epoch permutation; each takes a disjoint, strided
shard of every global batch, so together they see exactly the batch one process would.
Gradients are averaged by DistributedDataParallel; only rank 0 evaluates, prints, writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current_world() -> World:
    """The process group torchrun describes in the environment (one process otherwise)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(
        rank=int(os.environ["RANK"]),
        size=size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_process_group(world: World, device: torch.device) -> None:
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)


def shard(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's part of a global batch of indices: every `size`-th, from `rank`."""
    return batch[world.rank :: world.size]


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (to stop them all together)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wait_for_all(world: World) -> None:
    if world.distributed:
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
