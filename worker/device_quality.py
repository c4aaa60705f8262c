"""`worker.quality`'s blur and brightness measured on decoded tensors, where the pixels already
are when JPEGs are decoded on the model's device: no copy back to the CPU, one transfer of two
numbers per image.

The steps reproduce `measure_quality`: Pillow's luma (its fixed-point ITU-R 601 weights), its
BOX thumbnail of at most 256 px per side (size rounding, the whole-number `reduce` its
`reducing_gap` does first, then one rounded pass per axis whose windows hold the pixels whose
centres fall inside), the Laplacian's variance and the mean luma. Tested against Pillow.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from worker.quality import _QUALITY_SIDE, ImageQuality

# Pillow's L24: luma = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16
_LUMA_WEIGHTS = (19595, 38470, 7471)


def measure_quality_batch(images: Sequence[torch.Tensor]) -> list[ImageQuality]:
    """Blur and brightness of each uint8 RGB (3, H, W) image, on the images' own device."""
    if not images:
        return []
    figures = torch.stack([_figures(image) for image in images]).cpu().tolist()
    return [ImageQuality(blur=blur, brightness=brightness) for blur, brightness in figures]


def _figures(image: torch.Tensor) -> torch.Tensor:
    luma = _luma(image)
    height, width = int(luma.shape[0]), int(luma.shape[1])
    size = thumbnail_size(width, height, _QUALITY_SIDE)
    if size is not None:
        luma = _pil_box_thumbnail(luma, size)
    return torch.stack([_laplacian_variance(luma), luma.mean() / 255.0])


def _pil_box_thumbnail(luma: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pillow's `resize(size, BOX, reducing_gap=2.0)` of an 8-bit image, as whole numbers."""
    height, width = int(luma.shape[0]), int(luma.shape[1])
    factor_x = int(width / size[0] / _REDUCING_GAP) or 1
    factor_y = int(height / size[1] / _REDUCING_GAP) or 1
    span_x, span_y = float(width), float(height)
    if factor_x > 1 or factor_y > 1:
        luma = _reduce(luma, factor_x, factor_y)
        span_x, span_y = width / factor_x, height / factor_y
    if luma.shape[1] != size[0] or span_x != luma.shape[1]:
        luma = _round(luma @ _box_weights(int(luma.shape[1]), span_x, size[0], luma).T)
    if luma.shape[0] != size[1] or span_y != luma.shape[0]:
        luma = _round(_box_weights(int(luma.shape[0]), span_y, size[1], luma) @ luma)
    return luma


_REDUCING_GAP = 2.0


def _reduce(luma: torch.Tensor, factor_x: int, factor_y: int) -> torch.Tensor:
    """`Image.reduce`: the mean of each factor_y x factor_x block (fewer pixels in the last
    row and column of blocks), rounded half up."""
    height, width = int(luma.shape[0]), int(luma.shape[1])
    out_h, out_w = -(-height // factor_y), -(-width // factor_x)
    padded = F.pad(luma, (0, out_w * factor_x - width, 0, out_h * factor_y - height))
    sums = padded.reshape(out_h, factor_y, out_w, factor_x).sum(dim=(1, 3))
    ones = F.pad(torch.ones_like(luma), (0, out_w * factor_x - width, 0, out_h * factor_y - height))
    counts = ones.reshape(out_h, factor_y, out_w, factor_x).sum(dim=(1, 3))
    return torch.floor((sums + torch.floor(counts / 2)) / counts)


def _box_weights(in_size: int, span: float, out_size: int, like: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) weights of Pillow's BOX resampling of `span` input pixels."""
    return _box_weights_cpu(in_size, span, out_size).to(device=like.device, dtype=like.dtype)


@functools.lru_cache(maxsize=256)
def _box_weights_cpu(in_size: int, span: float, out_size: int) -> torch.Tensor:
    scale = span / out_size
    filter_scale = max(scale, 1.0)
    support = 0.5 * filter_scale
    centre = (torch.arange(out_size, dtype=torch.float64) + 0.5)[:, None] * scale
    pixel = torch.arange(in_size, dtype=torch.float64)[None, :]
    # Pillow's window: int() truncation of the bounds, clamped to the image
    first = torch.trunc(centre - support + 0.5).clamp(min=0)
    last = torch.trunc(centre + support + 0.5).clamp(max=in_size)
    offset = (pixel - centre + 0.5) / filter_scale
    inside = (pixel >= first) & (pixel < last) & (offset > -0.5) & (offset <= 0.5)
    weights = inside.to(torch.float64)
    return weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)


def _round(values: torch.Tensor) -> torch.Tensor:
    return torch.floor(values + 0.5).clamp_(0, 255)


def _luma(image: torch.Tensor) -> torch.Tensor:
    red, green, blue = (image[c].to(torch.int32) for c in range(3))
    weights = _LUMA_WEIGHTS
    fixed = red * weights[0] + green * weights[1] + blue * weights[2] + 0x8000
    return (fixed >> 16).to(torch.float64)


def _laplacian_variance(luma: torch.Tensor) -> torch.Tensor:
    if luma.shape[0] < 3 or luma.shape[1] < 3:
        return luma.new_zeros(())
    centre = luma[1:-1, 1:-1]
    laplacian = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4.0 * centre
    return laplacian.var(unbiased=False)


def thumbnail_size(width: int, height: int, side: int) -> tuple[int, int] | None:
    """(W, H) Pillow's `thumbnail((side, side))` gives, or None when it leaves the image as is."""
    if side >= width and side >= height:
        return None
    aspect = width / height
    x, y = side, side
    if x / y >= aspect:
        x = _round_aspect(y * aspect, lambda n: abs(aspect - n / y))
    else:
        y = _round_aspect(x / aspect, lambda n: 0 if n == 0 else abs(aspect - x / n))
    return x, y


def _round_aspect(number: float, key: Callable[[int], float]) -> int:
    return max(min(math.floor(number), math.ceil(number), key=key), 1)
