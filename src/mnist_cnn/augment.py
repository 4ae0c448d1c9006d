"""Batch-level augmentation on uint8 images, vectorised (no per-sample Python).

Randomness comes from a generator seeded by (seed, step), so a resumed run draws the same
shifts and flips as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) * 7_919 + 17)
    return generator


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Move each image [N,H,W] by up to `max_shift` pixels in x and y, filling with 0."""
    if max_shift <= 0:
        return images
    n, h, w = images.shape
    device = images.device
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1, 1), generator=generator, device=device)
    rows = dy + torch.arange(h, device=device).view(1, h, 1)
    cols = dx + torch.arange(w, device=device).view(1, 1, w)
    return padded[torch.arange(n, device=device).view(n, 1, 1), rows, cols]


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images left to right (for data sets where that is fair)."""
    flip = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1), images.flip(-1), images)


def random_affine(
    x: torch.Tensor, degrees: float, scale: float, generator: torch.Generator
) -> torch.Tensor:
    """Rotate each float image [N,1,H,W] by up to `degrees` either way and zoom it by a
    factor in 1 +- `scale`, about its centre (bilinear, zero outside): handwriting slants
    and varies in size, so a digit turned by 10 degrees is still the same digit."""
    n = len(x)
    device = x.device
    angle = (torch.rand(n, generator=generator, device=device) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(n, generator=generator, device=device) * 2 - 1) * scale
    # affine_grid maps output coordinates to input ones: the inverse of the wanted motion.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
