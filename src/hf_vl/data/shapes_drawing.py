"""Rasterisation of the embedded shapes: one binary mask per shape, drawn with PIL (C code, so fast).

Masks are drawn without anti-aliasing on purpose: the image is painted through exactly these masks, so image pixels,
instance masks and boxes agree pixel for pixel (the property the segmentation and detection tests rely on).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

# Shape names (class labels, in ClassLabel order).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ellipse", "diamond")

# Rotation ranges in degrees. Squares and diamonds only jitter: a square turned by 45 degrees would look like a
# diamond (the diamond is also elongated, 1 : 0.65, so the two stay apart); the other shapes keep their identity at
# any angle.
_ROTATION = {"circle": 0.0, "square": 10.0, "diamond": 10.0, "triangle": 180.0, "star": 180.0, "ellipse": 180.0}
_ELLIPSE_POINTS = 48


def _unit_outline(shape: str, aspect: float) -> np.ndarray:
    """Outline of a shape of "radius" 1 around the origin, (num_points, 2) as (x, y); image y points down."""
    if shape == "square":
        return np.array([[-0.7, -0.7], [0.7, -0.7], [0.7, 0.7], [-0.7, 0.7]])  # corners on the unit circle
    if shape == "diamond":
        return np.array([[0.0, -1.0], [0.65, 0.0], [0.0, 1.0], [-0.65, 0.0]])
    if shape == "triangle":
        angles = np.deg2rad([-90.0, 30.0, 150.0])  # equilateral, apex up
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "star":
        angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if shape == "ellipse":
        angles = np.linspace(0.0, 2.0 * math.pi, _ELLIPSE_POINTS, endpoint=False)
        return np.stack([np.cos(angles), aspect * np.sin(angles)], axis=1)
    raise ValueError(f"shape={shape!r} has no polygon outline; expected one of {SHAPES}")


def sample_pose(rng: np.random.Generator, shape: str) -> tuple[float, float]:
    """Random (rotation in degrees, ellipse aspect ratio) for one shape."""
    limit = _ROTATION[shape]
    angle = float(rng.uniform(-limit, limit)) if limit else 0.0
    aspect = float(rng.uniform(0.45, 0.6))
    return angle, aspect


def shape_mask(
    shape: str, center: tuple[float, float], radius: float, angle: float, aspect: float, size: tuple[int, int]
) -> np.ndarray:
    """Binary mask (height, width) of one shape.

    center: (x, y) in pixels; radius: circumradius in pixels; angle: rotation in degrees; aspect: minor / major
    axis of an ellipse (ignored otherwise); size: (width, height) of the image.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is unknown; expected one of {SHAPES}")
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = center
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
    else:
        theta = math.radians(angle)
        rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        points = _unit_outline(shape, aspect) @ rotation.T * radius + np.array([cx, cy])
        draw.polygon([tuple(p) for p in points.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


__all__ = ["SHAPES", "sample_pose", "shape_mask"]
