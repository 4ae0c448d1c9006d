"""Top-k class predictions for images, as the records `predict --json` prints."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from mnist_cnn.errors import UserError
from mnist_cnn.metrics import predict_logits


class NonFiniteOutput(UserError):
    """The model answers NaN or infinity: its weights are damaged (JSON has no NaN)."""

    def __init__(self, weights: str | os.PathLike | None = None):
        self.weights = weights
        where = f"the weights in {weights}" if weights is not None else "the model's weights"
        super().__init__(f"{where} give non-finite outputs (NaN or infinity): train the run again")


def check_finite(values: torch.Tensor, weights: str | os.PathLike | None = None) -> None:
    """NonFiniteOutput unless every value is a finite number."""
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteOutput(weights)


def predict_records(
    model: nn.Module,
    images: torch.Tensor,
    inputs: Sequence[str],
    classes: Sequence[str],
    top_k: int = 3,
    *,
    weights: str | os.PathLike | None = None,
) -> list[dict]:
    """One record per image: the top class, its probability, and the top-k list.

    `images` is uint8 [N,28,28]; `inputs` names each one (a file path or "test[N]").
    `weights`: the file the model came from, named if its outputs are NaN or infinite
    (`NonFiniteOutput`), which no record may carry.
    """
    if len(images) == 0:
        return []
    # One forward pass per image: a record is a function of its image alone, whatever other
    # images come with it (batched kernels round differently in the last bits, which the
    # rounded probabilities would show now and then). `serve` relies on this to answer
    # exactly as `predict` does.
    logits = torch.cat([predict_logits(model, images[i : i + 1]) for i in range(len(images))])
    check_finite(logits, weights)
    probs = torch.softmax(logits, dim=1)
    k = min(top_k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    records = []
    for name, vals, idxs in zip(inputs, values.tolist(), indices.tolist(), strict=True):
        top = [
            {"class_index": i, "class_name": classes[i], "probability": round(p, 6)}
            for p, i in zip(vals, idxs, strict=True)
        ]
        records.append({"input": name, **top[0], "top_k": top})
    return records
