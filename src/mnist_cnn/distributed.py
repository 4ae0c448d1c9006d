"""Data-parallel training across processes started by `torchrun` (PyTorch's own engine).

Every rank walks the same seeded per-epoch permutation; each takes a disjoint, strided
shard of every global batch, so together they see exactly the batch one process would.
Gradients are averaged by DistributedDataParallel; only rank 0 evaluates, prints, writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mnist_cnn.errors import UserError

# How long a process waits for the others to join the process group.
STORE_TIMEOUT = timedelta(minutes=5)
# What torchrun sets for each worker; WORLD_SIZE > 1 without the others is not torchrun.
ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # processes of this job on this machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current_world() -> World:
    """The process group torchrun describes in the environment (one process otherwise)."""
    values = {}
    for name in ENV[:4]:
        text = os.environ.get(name, "")
        try:
            values[name] = int(text) if text else None
        except ValueError:
            raise UserError(f"{name}={text!r} is not an integer: unset it or start with "
                            "torchrun") from None  # fmt: skip
    size = values["WORLD_SIZE"]
    if size is None or size <= 1:
        return World()
    missing = [name for name in ENV if not os.environ.get(name)]
    if missing:
        raise UserError(
            f"WORLD_SIZE={size} but {', '.join(missing)} not set: start distributed training "
            "with torchrun (see the README), or unset WORLD_SIZE"
        )
    port = os.environ["MASTER_PORT"]
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise UserError(f"MASTER_PORT={port!r} is not a port (1..65535): start with torchrun, "
                        "or unset WORLD_SIZE")  # fmt: skip
    rank, local_rank, local_size = values["RANK"], values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"]
    if not (0 <= rank < size and 0 <= local_rank < local_size <= size):
        raise UserError(f"RANK={rank}, LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_size} do "
                        f"not fit WORLD_SIZE={size}: start with torchrun")  # fmt: skip
    return World(rank=rank, size=size, local_rank=local_rank, local_size=local_size)


def init_process_group(world: World, device: torch.device) -> None:
    if not world.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend=backend)
        return
    # torchrun shares its own key-value store with the workers and keeps it across
    # restarts, while each new process group writes its rendezvous keys under the same
    # names as the last: a restarted worker could read a peer's address from before the
    # restart and fail to connect (pytorch/pytorch#135712). Rank 0's process hosts a store
    # of its own instead, new with every start, on the port after torchrun's.
    port = int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        port + 1 if port < 65535 else port - 1,
        world.size,
        is_master=world.is_main,
        timeout=STORE_TIMEOUT,
    )
    dist.init_process_group(backend=backend, store=store, rank=world.rank, world_size=world.size)


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
