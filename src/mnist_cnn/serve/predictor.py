"""One run's model behind a lock: image bytes in, the record `predict --json` prints out.

Nothing here knows about HTTP beyond the status code each kind of bad image deserves, so
the answers are those of the command line by construction: the same decoding (`read_gray8`:
the same formats, the same pixel limit), the same MNIST-style preparation for the run's
data set (`prepare_array` with `style_for`), the same records (`predict_records`).
"""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import torch
from PIL import Image

from mnist_cnn.errors import UserError
from mnist_cnn.images import decode_cost as _decode_cost
from mnist_cnn.images import open_image, prepare_array, read_gray8
from mnist_cnn.predict import predict_records
from mnist_cnn.run import Run


class ImageRejected(UserError):
    """An image the model cannot answer for; `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _rejected(exc: UserError) -> ImageRejected:
    """413 for an image over the pixel limit, 415 for one that cannot be read."""
    return ImageRejected(str(exc), 413 if "pixel limit" in str(exc) else 415)


def _named(data: bytes, name: str) -> io.BytesIO:
    source = io.BytesIO(data)
    source.name = name  # the image readers name the input in their messages
    return source


def decode_cost(data: bytes, name: str) -> int:
    """The bytes decoding this image file will hold at peak, from its header alone
    (`mnist_cnn.images.decode_cost`); ImageRejected if it will not be decoded at all."""
    try:
        with open_image(_named(data, name)) as image:
            return _decode_cost(image)
    except UserError as exc:
        raise _rejected(exc) from None


class Predictor:
    """A trained run, loaded once, answering from any number of threads.

    Decoding and preparing an image run in the caller's thread; only the forward pass
    is serialised. A lock costs little here: the network is small, a forward pass on one
    image takes well under a millisecond, and one pass at a time keeps PyTorch's own
    thread pool from being oversubscribed by many concurrent callers.
    """

    def __init__(self, run_dir: str | Path):
        run = Run(run_dir)
        self.run_dir = run.path
        self.model = run.load_model()
        self.classes: list[str] = list(run.classes)
        self.style = run.image_style
        self.info = {**run.info(), "style": self.style}
        self._lock = threading.Lock()

    def prepare(self, data: bytes, name: str) -> torch.Tensor:
        """Image file bytes -> the uint8 [28,28] image the model sees, as `predict` makes it."""
        try:
            gray = read_gray8(_named(data, name))
        except UserError as exc:
            raise _rejected(exc) from None
        try:
            return prepare_array(gray, self.style, name)
        except UserError as exc:
            raise ImageRejected(str(exc), 422) from None

    def predict(self, image: torch.Tensor, name: str, top_k: int = 3) -> dict:
        with self._lock:
            return predict_records(self.model, image[None], [name], self.classes, top_k)[0]

    def answer(self, data: bytes, name: str, top_k: int = 3) -> dict:
        """The `predict --json` record for one image file, plus `seen`: the 28x28 input as a
        base64 PNG."""
        image = self.prepare(data, name)
        record = self.predict(image, name, top_k)
        record["seen"] = png_base64(image)
        return record


def png_base64(image: torch.Tensor) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image.numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
