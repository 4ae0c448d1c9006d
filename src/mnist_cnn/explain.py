"""What a trained network learned: its first filters and its feature maps for one image."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mnist_cnn.data.batches import to_input
from mnist_cnn.errors import UserError
from mnist_cnn.figures import conv_filters, feature_maps
from mnist_cnn.metrics import predict_logits, uses_channels_last
from mnist_cnn.models import ViewAveraged
from mnist_cnn.predict import check_finite
from mnist_cnn.run import FEATURE_MAPS, FILTERS, WEIGHTS, Run


@torch.inference_mode()
def stage_outputs(model: nn.Module, image: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Each convolution stage's response, ReLU(conv) before pooling, for one uint8 image.

    The hook sits on the module feeding each max pooling (the convolution, or its
    BatchNorm), so the maps keep the stage's full resolution.
    """
    if isinstance(model, ViewAveraged):  # its stages, for the image as given
        model = model.net
    modules = list(model.modules())
    feeders = [modules[i - 1] for i, m in enumerate(modules) if isinstance(m, nn.MaxPool2d)]
    if not feeders:
        raise UserError("the model has no convolution stage to show")
    captured: list[tuple[str, torch.Tensor]] = []
    hooks = [
        module.register_forward_hook(
            lambda _m, _inp, out, name=f"conv {i + 1} + ReLU": captured.append(
                (name, torch.relu(out[0]).detach().clone())
            )
        )
        for i, module in enumerate(feeders)
    ]
    try:
        model(to_input(image.unsqueeze(0), uses_channels_last(model)))
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def explain_run(run_dir: str | Path, index: int, out: str | Path | None = None) -> list[Path]:
    """Write filters.png and feature_maps.png for test image `index` of the run's data."""
    run = Run(run_dir)
    model = run.load_model()
    test = run.dataset.test
    if not 0 <= index < len(test):
        raise UserError(
            f"--index {index} is out of range: the test set has {len(test)} images "
            f"(0..{len(test) - 1})"
        )
    image = test.images[index]
    logits = predict_logits(model, image.unsqueeze(0))
    check_finite(logits, run.path / WEIGHTS)  # else the figures would show NaN as an answer
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    name = Path(run.dataset_name).name
    filters = conv_filters(
        first.weight,
        f"{name}: the {first.out_channels} learned 3x3 filters of the first convolution",
        run.output(FILTERS, out),
    )
    label = run.classes[int(test.labels[index])]
    probs = torch.softmax(logits, dim=1)[0]
    predicted = run.classes[int(probs.argmax())]
    maps = feature_maps(
        image,
        stage_outputs(model, image),
        f"{name} test[{index}] (true {label}, predicted {predicted}): "
        "what each convolution stage computes",
        run.output(FEATURE_MAPS, out),
    )
    return [filters, maps]
