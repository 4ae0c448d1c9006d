"""Accuracy, loss, confusion matrix and per-class scores of a model on a split."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.data import Split
from mnist_cnn.data.batches import to_input

# Seconds to evaluate the 10,000 MNIST test images on 2 cores by batch size (inference
# mode, channels-last): 100: 0.14, 250: 0.15, 500: 0.19, 1000: 0.33, all at once: 0.66,
# which also costs far more memory. Small batches stay in the CPU's caches.
EVAL_BATCH_SIZE = 250


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    predictions: torch.Tensor  # int64 [N]
    probabilities: torch.Tensor  # float32 [N,K]
    labels: torch.Tensor  # int64 [N]

    @property
    def num_classes(self) -> int:
        return self.probabilities.shape[1]

    def confusion(self) -> torch.Tensor:
        """[K,K] counts: row = true class, column = predicted class."""
        k = self.num_classes
        flat = self.labels * k + self.predictions
        return torch.bincount(flat, minlength=k * k).reshape(k, k)

    def per_class(self) -> list[dict]:
        """Precision, recall, F1 and support for each class."""
        cm = self.confusion().double()
        tp = cm.diag()
        predicted = cm.sum(0)
        support = cm.sum(1)
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
        recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
        denom = precision + recall
        f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), 0 * tp)
        return [
            {
                "class_index": i,
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in range(self.num_classes)
        ]


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def uses_channels_last(model: nn.Module) -> bool:
    """Whether the model's 4-d weights are stored channels-last (the first whose layout is
    not ambiguous: a weight with one input channel is contiguous either way)."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[1] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE
) -> torch.Tensor:
    """Logits (float32, on CPU) for uint8 images [N,28,28], in batches, without gradients."""
    device = model_device(model)
    channels_last = uses_channels_last(model)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start : start + batch_size].to(device), channels_last)
        out.append(model(x).float().cpu())
    model.train(was_training)
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)


def evaluate(model: nn.Module, split: Split, batch_size: int = EVAL_BATCH_SIZE) -> Evaluation:
    """Accuracy and mean cross-entropy of `model` on `split` (the notebook's accuracy()).

    Always in float32, so the figure a run reports is the one `evaluate` gives later.
    """
    logits = predict_logits(model, split.images, batch_size)
    labels = split.labels
    loss = F.cross_entropy(logits, labels).item()
    predictions = logits.argmax(1)
    accuracy = (predictions == labels).double().mean().item()
    return Evaluation(
        accuracy=accuracy,
        loss=loss,
        predictions=predictions,
        probabilities=torch.softmax(logits, 1),
        labels=labels,
    )
