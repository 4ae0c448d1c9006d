"""A user's image file -> the 28x28 uint8 image a model expects.

Digits are prepared the way MNIST was made: grayscale; inverted when the background is
light (ink on paper); contrast normalised; cropped to the ink's bounding box; scaled to
fit 20x20 keeping the aspect ratio, anti-aliased; placed in a 28x28 frame by its centre
of mass. Fashion items are prepared the way Fashion-MNIST was: the item fills the frame,
light on a dark background. An image that is already 28x28 with a dark background is
taken as it is.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from mnist_cnn.errors import UserError

SIZE = 28
DIGIT_BOX = 20
# Images over this many pixels are refused before decoding (a 40-megapixel photo is
# far beyond what a 28x28 input needs, and decompression bombs are this shape).
MAX_PIXELS = 40_000_000
INK_FLOOR = 0.2  # after contrast normalisation, fainter pixels are background, not ink
MIN_CONTRAST = 32  # gray levels between background and ink; less is a blank picture
WORKING_SIZE = 280  # larger pictures are shrunk to this before looking for the ink


def read_grayscale(source) -> np.ndarray:
    """Decode an image (path or file object) to float32 grayscale in [0,255]."""
    name = getattr(source, "name", source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise UserError(
                    f"{name}: {width}x{height} is over the {MAX_PIXELS:,}-pixel limit; "
                    "downscale the image first"
                )
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                # Transparent areas are background: flatten onto white paper.
                rgba = image.convert("RGBA")
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(paper, rgba)
            gray = image.convert("L")
            return np.asarray(gray, dtype=np.float32)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a folder, not an image file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{name}: not an image file Pillow can read (PNG, JPEG, ...)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"{name}: unreadable image ({exc})") from None


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])


def _denoised(a: np.ndarray) -> np.ndarray:
    """Shrink large pictures (anti-aliased) and take a 3x3 median: speckle is not ink."""
    image = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    longest = max(image.size)
    if longest > WORKING_SIZE:
        scale = WORKING_SIZE / longest
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    if min(image.size) >= 3:
        image = image.filter(ImageFilter.MedianFilter(3))
    return np.asarray(image, dtype=np.float32)


def _normalise(a: np.ndarray, name: str) -> np.ndarray:
    """Light ink on a dark background, background 0, strongest ink 1, faint noise 0."""
    if np.median(_border(a)) > 127:
        a = 255.0 - a
    a = _denoised(a)
    background = float(np.median(_border(a)))
    ink = float(a.max())
    if ink - background < MIN_CONTRAST:
        raise UserError(f"{name}: no ink found (the image is blank or has no contrast)")
    a = np.clip((a - background) / (ink - background), 0.0, 1.0)
    a[a < INK_FLOOR] = 0.0
    return a


def _crop_to_ink(a: np.ndarray, name: str) -> np.ndarray:
    rows = np.flatnonzero(a.max(1) > 0)
    cols = np.flatnonzero(a.max(0) > 0)
    if rows.size == 0:
        raise UserError(f"{name}: no ink found (the image is blank or has no contrast)")
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _fit(a: np.ndarray, box: int) -> np.ndarray:
    """Scale so the longer side is `box` pixels, keeping the aspect ratio, anti-aliased."""
    h, w = a.shape
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = Image.fromarray((a * 255).astype(np.uint8))
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 255


def _place_by_centre_of_mass(a: np.ndarray) -> np.ndarray:
    frame = np.zeros((SIZE, SIZE), dtype=np.float32)
    total = float(a.sum())
    ys, xs = np.indices(a.shape)
    cy = float((ys * a).sum()) / total if total > 0 else a.shape[0] / 2
    cx = float((xs * a).sum()) / total if total > 0 else a.shape[1] / 2
    top = round(SIZE / 2 - cy)
    left = round(SIZE / 2 - cx)
    top = min(max(top, 0), SIZE - a.shape[0])
    left = min(max(left, 0), SIZE - a.shape[1])
    frame[top : top + a.shape[0], left : left + a.shape[1]] = a
    return frame


def _place_centred(a: np.ndarray) -> np.ndarray:
    frame = np.zeros((SIZE, SIZE), dtype=np.float32)
    top = (SIZE - a.shape[0]) // 2
    left = (SIZE - a.shape[1]) // 2
    frame[top : top + a.shape[0], left : left + a.shape[1]] = a
    return frame


def is_mnist_like(gray: np.ndarray) -> bool:
    """28x28 with a dark background: already what the model expects."""
    return gray.shape == (SIZE, SIZE) and np.median(_border(gray)) <= 127


def prepare_array(gray: np.ndarray, style: str = "digit", name: str = "image") -> torch.Tensor:
    """Grayscale float array [H,W] in [0,255] -> uint8 tensor [28,28], MNIST-style."""
    if is_mnist_like(gray):
        return torch.from_numpy(np.clip(np.rint(gray), 0, 255).astype(np.uint8))
    ink = _crop_to_ink(_normalise(gray, name), name)
    if style == "fashion":
        frame = _place_centred(_fit(ink, SIZE))
    else:
        frame = _place_by_centre_of_mass(_fit(ink, DIGIT_BOX))
    return torch.from_numpy(np.rint(frame * 255).astype(np.uint8))


def load_image(source, style: str = "digit") -> torch.Tensor:
    """Read and prepare one image file: uint8 tensor [28,28]."""
    name = str(getattr(source, "name", source))
    return prepare_array(read_grayscale(source), style, name)


def style_for(dataset: str) -> str:
    """How a data set's images were made, as its catalogue entry declares: `fashion` (the
    item fills the frame) or `digit` (the default, also for a folder of IDX files)."""
    from mnist_cnn.data.catalog import spec_for

    spec = spec_for(dataset)
    return spec.image_style if spec else "digit"
