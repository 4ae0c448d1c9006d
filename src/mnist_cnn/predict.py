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
    probs = torch.softmax(predict_logits(model, images), dim=1)
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
