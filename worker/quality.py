"""Cheap image-quality signals computed from the already decoded pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# Measured on a fixed-size thumbnail (box-filtered: exact averaging for whole-number scales) so
# the blur score does not depend on the upload resolution.
_QUALITY_SIDE = 256


@dataclass(frozen=True)
class ImageQuality:
    """`blur`: variance of the Laplacian (low = blurry). `brightness`: mean luma in [0, 1]."""

    blur: float
    brightness: float


def measure_quality(image: Image.Image) -> ImageQuality:
    """Blur and brightness of `image`, measured on a grayscale thumbnail."""
    gray = image.convert("L")
    gray.thumbnail((_QUALITY_SIDE, _QUALITY_SIDE), Image.Resampling.BOX)
    luma = np.asarray(gray, dtype=np.float32)
    return ImageQuality(blur=laplacian_variance(luma), brightness=float(luma.mean() / 255.0))


def laplacian_variance(luma: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a 2-D array (0 for images under 3x3)."""
    if luma.shape[0] < 3 or luma.shape[1] < 3:
        return 0.0
    centre = luma[1:-1, 1:-1]
    laplacian = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4.0 * centre
    return float(laplacian.var())
