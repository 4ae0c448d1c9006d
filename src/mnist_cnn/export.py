"""ONNX export of a trained run, with its preprocessing contract and a parity check.

The exported graph takes float32 images `[N,1,28,28]` scaled to [0,1] (uint8 / 255, light
ink on a dark background, prepared as `mnist_cnn.images` does) and returns class
probabilities `[N,K]`. The batch dimension is dynamic. The contract travels in the model's
metadata so that a consumer outside Python needs nothing else.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mnist_cnn import __version__
from mnist_cnn.data import Split
from mnist_cnn.data.batches import to_input
from mnist_cnn.errors import UserError
from mnist_cnn.io import atomic_path
from mnist_cnn.metrics import predict_logits
from mnist_cnn.models import ViewAveraged
from mnist_cnn.paths import cannot_write
from mnist_cnn.predict import check_finite
from mnist_cnn.run import ONNX, WEIGHTS, Run

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
PARITY_IMAGES = 1000
PARITY_TOLERANCE = 1e-4


class WithSoftmax(nn.Module):
    """The model followed by softmax: the exported graph returns probabilities."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(images), dim=-1)


class WithStages(WithSoftmax):
    """Probabilities, then each convolution stage's maps as extra outputs `stage1`, ...:
    ReLU of what feeds each max pooling, the maps `explain` draws (the web page's layer
    view shows them). A view-averaging model runs its network once per view; the first run
    is the image as given, and its maps are the ones returned."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        modules = list((model.net if isinstance(model, ViewAveraged) else model).modules())
        self.feeders = [
            modules[i - 1] for i, m in enumerate(modules) if isinstance(m, nn.MaxPool2d)
        ]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps: list[torch.Tensor] = []
        hooks = [f.register_forward_hook(lambda _m, _i, out: maps.append(torch.relu(out)))
                 for f in self.feeders]  # fmt: skip
        try:
            probabilities = super().forward(images)
        finally:
            for hook in hooks:
                hook.remove()
        return (probabilities, *maps[: len(self.feeders)])


@dataclass(frozen=True)
class Parity:
    images: int
    classes_agree: int
    max_probability_difference: float

    @property
    def ok(self) -> bool:
        return (
            self.classes_agree == self.images and self.max_probability_difference < PARITY_TOLERANCE
        )


@contextlib.contextmanager
def _quiet():
    """The exporter narrates each pass on stdout and logs warnings about torchvision."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError(
            "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'mnist-cnn[export]'"
        ) from None
    return onnx, onnxruntime


def export_onnx(
    run_dir: str | Path, out: str | Path | None = None, *, stages: bool = False
) -> tuple[Path, Parity]:
    """Write RUN_DIR's model as ONNX (default RUN_DIR/model.onnx), then check parity.

    `stages`: also output each convolution stage's maps (`WithStages`).

    The file is written to a temp name and renamed only after the parity check passes.
    """
    onnx, _ = _require_onnx()
    run = Run(run_dir)
    model = run.load_model()
    config = run.config
    out = run.output(ONNX) if out is None else Path(out)
    if out.is_dir() or not out.parent.is_dir():  # refused before the slow export
        missing = FileNotFoundError(2, f"no folder {out.parent}")
        raise cannot_write(out, missing, "choose another --out")
    # A model that answers NaN cannot pass parity: say why, before the slow export.
    check_finite(predict_logits(model, run.dataset.test.images[:PARITY_IMAGES]), run.path / WEIGHTS)
    # Traced in the default layout: the graph then needs no layout conversions.
    wrapper = WithStages if stages else WithSoftmax
    wrapped = wrapper(copy.deepcopy(model).to(memory_format=torch.contiguous_format)).eval()
    example = torch.zeros(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1)
    try:
        with atomic_path(out) as tmp:
            program = _export(wrapped, example, batch, len(getattr(wrapped, "feeders", ())))
            _write_model(onnx, program.model_proto, _metadata(config), tmp)
            parity = check_parity(tmp, model, run.dataset.test)
            if not parity.ok:
                raise UserError(
                    f"ONNX parity check failed: {parity.classes_agree}/{parity.images} classes "
                    f"agree, max probability difference {parity.max_probability_difference:.2e}"
                )
    except OSError as exc:
        raise cannot_write(out, exc, "choose another --out") from None
    return out, parity


def _export(wrapped: nn.Module, example: torch.Tensor, batch, stages: int = 0):
    with _quiet():
        return torch.onnx.export(
            wrapped,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME, *(f"stage{i + 1}" for i in range(stages))],
            dynamic_shapes={"images": {0: batch}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def _metadata(config: dict) -> dict[str, str]:
    """The preprocessing contract, carried in the model so a consumer needs nothing else."""
    return {
        "mnist_cnn_version": __version__,
        "dataset": str(config["dataset"]),
        "model": config["recipe"]["model"],
        "input_shape": json.dumps(["N", 1, 28, 28]),
        "input_scale": "float32 = uint8 / 255, in [0, 1]",
        "input_layout": "NCHW, one channel, light ink on a dark background",
        "preprocessing": "MNIST-style: grayscale, inverted if the background is light, "
        "cropped to the ink, fit in 20x20, centred by mass in 28x28",
        "output": "class probabilities (softmax), shape [N, K]",
        "class_names": json.dumps(list(config["classes"])),
    }


def _write_model(onnx, proto, metadata: dict[str, str], path: Path) -> None:
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def check_parity(onnx_path: Path, model: nn.Module, test: Split) -> Parity:
    """Run the ONNX file in onnxruntime beside PyTorch on the first 1,000 test images."""
    _, ort = _require_onnx()
    images = test.images[:PARITY_IMAGES]
    expected = torch.softmax(predict_logits(model, images), dim=-1).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: to_input(images).numpy()})[0]
    return Parity(
        images=len(images),
        classes_agree=int((got.argmax(1) == expected.argmax(1)).sum()),
        max_probability_difference=float(np.abs(got - expected).max()),
    )
