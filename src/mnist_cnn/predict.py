"""Top-k class predictions for images, as the records `predict --json` prints."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mnist_cnn.metrics import predict_logits


def predict_records(
    model: nn.Module,
    images: torch.Tensor,
    inputs: Sequence[str],
    classes: Sequence[str],
    top_k: int = 3,
) -> list[dict]:
    """One record per image: the top class, its probability, and the top-k list.

    `images` is uint8 [N,28,28]; `inputs` names each one (a file path or "test[N]").
    """
    if len(images) == 0:
        return []
    # One forward pass per image: a record is a function of its image alone, whatever other
    # images come with it (batched kernels round differently in the last bits, which the
    # rounded probabilities would show now and then). `serve` relies on this to answer
    # exactly as `predict` does.
    logits = torch.cat([predict_logits(model, images[i : i + 1]) for i in range(len(images))])
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
