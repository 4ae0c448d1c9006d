"""ONNX export of a trained run, with its preprocessing contract and a parity check.

The exported graph takes float32 images `[N,1,28,28]` scaled to [0,1] (uint8 / 255, light
ink on a dark background, prepared as `mnist_cnn.images` does) and returns class
probabilities `[N,K]`. The batch dimension is dynamic. The contract travels in the model's
metadata so that a consumer outside Python needs nothing else.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mnist_cnn import __version__, rundir
from mnist_cnn.data import load_dataset
from mnist_cnn.errors import UserError
from mnist_cnn.metrics import to_input

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


def export_onnx(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, Parity]:
    """Write RUN_DIR's model as ONNX (default RUN_DIR/model.onnx), then check parity.

    The file is written to a temp name and renamed only after the parity check passes.
    """
    onnx, _ = _require_onnx()
    run_dir = Path(run_dir)
    model = rundir.load_model(run_dir)
    config = rundir.read_json(run_dir / rundir.CONFIG)
    out = Path(out) if out is not None else run_dir / "model.onnx"
    if out.parent and not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a folder: choose another --out")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    wrapped = WithSoftmax(model).eval()
    example = torch.zeros(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet():
            program = torch.onnx.export(
                wrapped,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"images": {0: batch}},
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        proto = program.model_proto
        metadata = {
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
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
        parity = check_parity(tmp, model, config["dataset"])
        if not parity.ok:
            raise UserError(
                f"ONNX parity check failed: {parity.classes_agree}/{parity.images} classes "
                f"agree, max probability difference {parity.max_probability_difference:.2e}"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, parity


def check_parity(onnx_path: Path, model: nn.Module, dataset: str) -> Parity:
    """Run the ONNX file in onnxruntime beside PyTorch on the first 1,000 test images."""
    _, ort = _require_onnx()
    images = load_dataset(dataset).test.images[:PARITY_IMAGES]
    x = to_input(images)
    with torch.inference_mode():
        expected = torch.softmax(model(x), dim=-1).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    return Parity(
        images=len(images),
        classes_agree=int((got.argmax(1) == expected.argmax(1)).sum()),
        max_probability_difference=float(np.abs(got - expected).max()),
    )
