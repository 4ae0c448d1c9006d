"""Ready training batches from any step: order, DDP shard, augmentation, input layout.

The whole split sits on the training device as uint8 (as airbench keeps CIFAR-10); a batch
is an index slice of a seeded per-epoch permutation, augmented and turned into the model's
float input in a few tensor ops. Everything random is a function of (seed, epoch) or
(seed, step) alone, so a source started at step k yields exactly what an uninterrupted one
yields from step k, in any process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mnist_cnn.augment import random_affine, random_flip, random_shift, step_generator
from mnist_cnn.data import Split
from mnist_cnn.distributed import World, shard


def to_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 [N,28,28] -> float [N,1,28,28] in [0,1], the notebook's Float32.(img)."""
    x = images.unsqueeze(1).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch`: a function of (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def total_steps(epochs: float, n: int, batch_size: int) -> int:
    """Steps of a whole run; `epochs` may be fractional (1.5: one and a half passes)."""
    return math.ceil(epochs * math.ceil(n / batch_size))


@dataclass(frozen=True)
class Augmentation:
    """What is done to each training image; all zero: nothing."""

    shift: int = 0  # move by up to this many pixels
    flip: bool = False  # mirror half of them
    rotate: float = 0.0  # turn by up to this many degrees
    scale: float = 0.0  # zoom by a factor in 1 +- this

    def __bool__(self) -> bool:
        return bool(self.shift or self.flip or self.rotate or self.scale)


@dataclass(frozen=True)
class Batch:
    step: int  # 0-based index of the step this batch is for
    epoch: int
    x: torch.Tensor  # this rank's float input [n,1,28,28]
    y: torch.Tensor  # its labels
    images: int  # images in the whole (global) batch, every rank together
    end_of_epoch: bool  # the last batch of its epoch, or of the run


class BatchSource:
    """The batches of a training run, from any step to the end."""

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        epochs: float,
        seed: int,
        device: torch.device,
        world: World | None = None,
        augmentation: Augmentation | None = None,
        channels_last: bool = False,
    ):
        world, augmentation = world or World(), augmentation or Augmentation()
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.world, self.augmentation, self.channels_last = world, augmentation, channels_last
        self.n = len(self.labels)
        self.steps_per_epoch = math.ceil(self.n / batch_size)
        self.total_steps = total_steps(epochs, self.n, batch_size)

    def __len__(self) -> int:
        return self.total_steps

    def from_step(self, step: int = 0) -> Iterator[Batch]:
        """Every batch from `step` (0-based) to the end of the run."""
        while step < self.total_steps:
            epoch, first = divmod(step, self.steps_per_epoch)
            order = epoch_permutation(self.n, self.seed, epoch).to(self.device)
            last = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
            for index in range(first, last):
                global_batch = order[index * self.batch_size : (index + 1) * self.batch_size]
                yield self.batch(step, epoch, global_batch, index == last - 1)
                step += 1

    def batch(self, step: int, epoch: int, global_batch: torch.Tensor, end: bool) -> Batch:
        """This rank's share of one global batch of indices, ready for the model."""
        idx = shard(global_batch, self.world)
        images = self.images[idx]
        aug = self.augmentation
        generator = step_generator(self.seed, step, self.device) if aug else None
        if aug.shift:
            images = random_shift(images, aug.shift, generator)
        if aug.flip:
            images = random_flip(images, generator)
        x = to_input(images)
        if aug.rotate or aug.scale:
            x = random_affine(x, aug.rotate, aug.scale, generator)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return Batch(step, epoch, x, self.labels[idx], len(global_batch), end)
