"""Handwriting-like digits drawn as pen strokes, for tests of image preparation and drawing.

Each digit is a list of strokes; each stroke a list of (x, y) points in a unit box
(x right, y down). The shapes follow how people write digits (a 9 with a straight tail,
a 7 without a bar), which is what MNIST holds, rather than a typeface's shapes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

Point = tuple[float, float]


def _arc(cx, cy, rx, ry, start_deg, end_deg, n=24) -> list[Point]:
    """Points along an ellipse, angles in degrees clockwise from 3 o'clock (y is down)."""
    angles = np.linspace(math.radians(start_deg), math.radians(end_deg), n)
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


STROKES: dict[int, list[list[Point]]] = {
    0: [_arc(0.5, 0.5, 0.28, 0.42, 0, 360, 40)],
    1: [[(0.42, 0.2), (0.55, 0.08), (0.55, 0.92)]],
    2: [[*_arc(0.5, 0.32, 0.27, 0.24, 200, 360 + 30), (0.22, 0.9), (0.8, 0.9)]],
    3: [_arc(0.47, 0.3, 0.26, 0.21, 210, 450), _arc(0.47, 0.7, 0.29, 0.22, 270, 520)],
    4: [[(0.55, 0.08), (0.18, 0.62), (0.82, 0.62)], [(0.62, 0.3), (0.62, 0.93)]],
    5: [
        [(0.78, 0.1), (0.3, 0.1), (0.26, 0.45)],
        [(0.26, 0.45), *_arc(0.48, 0.66, 0.3, 0.26, 235, 500)[1:]],
    ],
    6: [[(0.7, 0.08), (0.45, 0.3), (0.28, 0.6)], _arc(0.5, 0.7, 0.23, 0.21, 180, 540, 36)],
    7: [[(0.2, 0.1), (0.8, 0.1), (0.42, 0.92)]],
    8: [_arc(0.5, 0.28, 0.21, 0.19, 90, 450, 32), _arc(0.5, 0.7, 0.26, 0.22, -90, 270, 32)],
    9: [_arc(0.5, 0.3, 0.23, 0.21, 0, 360, 32), [(0.73, 0.3), (0.7, 0.92)]],
}


def draw_digit(
    digit: int,
    size: int = 280,
    *,
    thickness: float = 0.1,
    box: tuple[float, float, float, float] = (0.2, 0.15, 0.6, 0.7),
    angle: float = 0.0,
    ink: tuple[int, int, int] = (20, 20, 20),
    paper: tuple[int, int, int] = (245, 245, 240),
) -> Image.Image:
    """An RGB picture of `digit`: dark ink strokes on light paper.

    `box` is (left, top, width, height) of the digit as fractions of the picture;
    `thickness` is the pen width as a fraction of the digit's height.
    """
    image = Image.new("RGB", (size, size), paper)
    pen = ImageDraw.Draw(image)
    left, top, width, height = (v * size for v in box)
    width_px = max(1, round(thickness * height))
    for stroke in strokes_in_box(digit, (left, top, width, height)):
        pen.line(stroke, fill=ink, width=width_px, joint="curve")
        r = width_px / 2
        for x, y in (stroke[0], stroke[-1]):  # round pen ends
            pen.ellipse((x - r, y - r, x + r, y + r), fill=ink)
    if angle:
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=paper)
    return image


def strokes_in_box(digit: int, box: tuple[float, float, float, float]) -> list[list[Point]]:
    """The digit's strokes in pixel coordinates inside box (left, top, width, height)."""
    left, top, width, height = box
    return [[(left + x * width, top + y * height) for x, y in stroke] for stroke in STROKES[digit]]


def photo_like(digit: int, rng: np.random.Generator) -> Image.Image:
    """`digit` as a phone photo of paper might show it: its size, place, tilt, pen width,
    ink and paper colours and sensor noise all drawn from `rng`."""
    w, h = rng.uniform(0.2, 0.5), rng.uniform(0.4, 0.75)
    box = (rng.uniform(0.05, 0.95 - w), rng.uniform(0.05, 0.95 - h), w, h)
    picture = draw_digit(
        digit, int(rng.integers(48, 420)), thickness=rng.uniform(0.07, 0.15), box=box,
        angle=rng.uniform(-8, 8), ink=tuple(int(v) for v in rng.integers(0, 90, 3)),
        paper=tuple(int(v) for v in rng.integers(160, 256, 3)),
    )  # fmt: skip
    rgb = np.asarray(picture, dtype=np.float32)
    noisy = np.clip(rgb + rng.normal(0, rng.uniform(0, 10), rgb.shape), 0, 255)
    return Image.fromarray(noisy.astype(np.uint8))
