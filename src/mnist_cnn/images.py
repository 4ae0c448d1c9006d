"""A user's image file -> the 28x28 uint8 image a model expects.

Digits are prepared the way MNIST was made: grayscale; inverted when the background is
light (ink on paper); contrast normalised; cropped to the ink's bounding box; scaled to
fit 20x20 keeping the aspect ratio, anti-aliased; placed in a 28x28 frame by its centre
of mass. Fashion items are prepared the way Fashion-MNIST was: the item fills the frame,
light on a dark background. An image that is already 28x28 with a dark background is
taken as it is.
"""

from __future__ import annotations

import re
import struct
import warnings

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFilter, UnidentifiedImageError

from mnist_cnn.errors import UserError

SIZE = 28
DIGIT_BOX = 20
# Images over this many pixels are refused before decoding (a 40-megapixel photo is
# far beyond what a 28x28 input needs, and decompression bombs are this shape).
MAX_PIXELS = 40_000_000
# What phones, cameras and browsers produce; no other Pillow plugin is ever asked to read a
# file (EPS would start Ghostscript, and every extra parser is one more way in).
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
FORMAT_NAMES = "PNG, JPEG, GIF, BMP or WebP"
INK_FLOOR = 0.2  # after contrast normalisation, fainter pixels are background, not ink
MIN_CONTRAST = 32  # gray levels between background and ink; less is a blank picture
WORKING_SIZE = 280  # larger pictures are shrunk to this before looking for the ink

# Bytes per pixel Pillow keeps for a decoded image of each mode (others: 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _pixel_limit_error(name, pixels: int, size: str = "") -> UserError:
    what = size or f"{pixels:,} pixels"
    return UserError(
        f"{name}: {what} is over the {MAX_PIXELS:,}-pixel limit; downscale the image first"
    )


def _check_pixels(image: Image.Image, name) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise _pixel_limit_error(name, width * height, f"{width}x{height}")


def open_image(source) -> Image.Image:
    """Open an image (path or file object) without decoding it: one of FORMATS, within
    MAX_PIXELS; UserError otherwise. Reads only the header."""
    name = getattr(source, "name", source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source, formats=FORMATS)
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a folder, not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own, higher limit: the message holds the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _pixel_limit_error(name, int(found[1]) if found else MAX_PIXELS + 1) from None
    except UnidentifiedImageError:
        raise UserError(
            f"{name}: not an image file of a format this reads ({FORMAT_NAMES}): "
            "save it as PNG or JPEG"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UserError(f"{name}: unreadable image ({exc})") from None
    _check_pixels(image, name)
    return image


def decode_cost(image: Image.Image) -> int:
    """An upper bound of the bytes `read_gray8` (and `prepare_array` after it) hold at once
    for this opened image, from its header: the most of any one stage, in bytes per pixel,
    plus one. Measured peaks for 40-megapixel files: RGB JPEG 4.8, progressive JPEG 6.7,
    RGB PNG 4.8, RGBA PNG 11.4, WebP 15.3, 1-bit or gray PNG and GIF 2.9."""
    stored = _MODE_BYTES.get(image.mode, 4)
    decoding = stored
    if image.info.get("progressive"):
        decoding += 6  # a progressive JPEG's coefficients: 3 components of int16
    if image.format == "WEBP":
        decoding += 11  # libwebp's canvas, and Pillow's copy of it
    if _has_transparency(image):
        # The picture and its RGBA copy; then the copy, white paper and their composite.
        flattening, gray = max(stored + 4, 12), 4 + 1
    else:
        flattening, gray = 0, stored + 1
    shrinking = 3  # the gray array, its inverse and its Pillow copy, one byte each
    width, height = image.size
    return width * height * (max(decoding, flattening, gray, shrinking) + 1)


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def read_gray8(source) -> np.ndarray:
    """Decode an image (path or file object) to uint8 grayscale [H,W]: transparent areas
    white, turned as its EXIF orientation says. The first frame only; its size is checked
    again once decoded, whatever the header said."""
    image = open_image(source)
    name = getattr(source, "name", source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            _check_pixels(image, name)
            turn = _ORIENTATION.get(image.getexif().get(ExifTags.Base.Orientation, 1))
            if _has_transparency(image):
                # Transparent areas are background: flatten onto white paper.
                rgba = image.convert("RGBA")
                image.close()
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(paper, rgba)
                del rgba, paper
            if image.mode == "L":
                gray = image
            else:
                gray = image.convert("L")
                image.close()
            del image
            # Turned after the gray conversion (pixel by pixel, so the same result): the
            # copy is then one byte per pixel, not four.
            if turn is not None:
                gray = gray.transpose(turn)
            return np.asarray(gray)
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise UserError(f"{name}: unreadable image ({exc})") from None


def read_grayscale(source) -> np.ndarray:
    """Decode an image (path or file object) to float32 grayscale in [0,255]."""
    return read_gray8(source).astype(np.float32)


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])


def _denoised(a: np.ndarray) -> np.ndarray:
    """Shrink large pictures (anti-aliased) and take a 3x3 median: speckle is not ink."""
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    image = Image.fromarray(a)
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
        a = 255 - a  # uint8 stays uint8: one byte per pixel
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
    """Grayscale array [H,W] in [0,255] (uint8, or float) -> uint8 tensor [28,28],
    MNIST-style. A large picture stays one byte per pixel until it is shrunk."""
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
    return prepare_array(read_gray8(source), style, name)


def style_for(dataset: str) -> str:
    """How a data set's images were made, as its catalogue entry declares: `fashion` (the
    item fills the frame) or `digit` (the default, also for a folder of IDX files)."""
    from mnist_cnn.data.catalog import spec_for

    spec = spec_for(dataset)
    return spec.image_style if spec else "digit"
