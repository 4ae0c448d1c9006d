"""The baseline we measure against: the seed recipe as a PyTorch user would write it.

It follows pytorch/examples' MNIST script: a `Dataset` that hands out one image at a time,
`DataLoader(batch_size=128, shuffle=True)`, `model.train()`, Adam(1e-3), cross-entropy,
and a `torch.no_grad()` test pass over `DataLoader(batch_size=1000)` after every epoch.
The network is the notebook's, written inline with PyTorch's default initialisation.
Only the raw uint8 tensors come from `mnist_cnn.load_dataset`, so both sides read the
same bytes; everything after that is plain PyTorch.

    python benchmarks/reference.py --dataset mnist --epochs 2 --seed 0 [--target 0.98] [--json]
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from measure import common_parser, load_limited, median_seconds, report, result_record
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mnist_cnn import UserError


class ImageDataset(Dataset):
    """One `(float image [1,28,28] in [0,1], label)` pair per index, as torchvision's MNIST."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].unsqueeze(0).float() / 255, int(self.labels[index])


def seed_network(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(288, num_classes),
    )


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    for images, labels in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()


def test(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Mean test loss and accuracy."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images)
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
    n = len(loader.dataset)
    return loss / n, correct / n


def main(argv: list[str] | None = None) -> int:
    args = common_parser(__doc__.splitlines()[0]).parse_args(argv)
    try:
        ds = load_limited(args.dataset, args.train_limit, args.test_limit)
    except UserError as exc:
        print(f"reference.py: error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    train_loader = DataLoader(
        ImageDataset(ds.train.images, ds.train.labels), batch_size=128, shuffle=True
    )
    test_loader = DataLoader(ImageDataset(ds.test.images, ds.test.labels), batch_size=1000)
    model = seed_network(ds.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    epoch_seconds, epoch_accuracies = [], []
    for _ in range(args.epochs):
        start = time.perf_counter()
        train_epoch(model, train_loader, optimizer)
        epoch_seconds.append(time.perf_counter() - start)
        epoch_accuracies.append(test(model, test_loader)[1])

    eval_seconds = median_seconds(lambda: test(model, test_loader), args.eval_repeats)
    record = result_record(
        epoch_seconds,
        epoch_accuracies,
        eval_seconds,
        test_accuracy=epoch_accuracies[-1],
        test_images=len(ds.test),
        target=args.target,
        side="reference",
        precision="fp32",
    )
    report(record, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
