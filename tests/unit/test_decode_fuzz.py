"""Fuzzing the image loader (issue 14, hostile input): whatever the bytes, `decode_image`
returns an RGB image within the pixel limit or raises `ImageRejected` with a one-line reason.
Nothing else escapes, nothing hangs."""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from contract.errors import ImageRejected
from worker.decode import decode_image

MAX_PIXELS = 4_000_000


def _seed(format_name: str, mode: str = "RGB", **options: object) -> bytes:
    image = Image.new(mode, (48, 32), 128 if mode in ("L", "P") else (200, 30, 60))
    buffer = io.BytesIO()
    image.save(buffer, format_name, **options)
    return buffer.getvalue()


SEEDS = [
    _seed("JPEG"),
    _seed("JPEG", "CMYK"),
    _seed("PNG"),
    _seed("PNG", "P"),
    _seed("PNG", "RGBA"),
    _seed("WEBP"),
    _seed("GIF", "P"),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid image of some format with bytes flipped, cut, or spliced in."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=64))
    return bytes(data)


def _decodes_or_is_rejected(data: bytes) -> None:
    try:
        decoded = decode_image(data, max_pixels=MAX_PIXELS, draft_size=64)
    except ImageRejected as error:
        assert str(error) and "\n" not in str(error)
        return
    assert decoded.pixels.mode == "RGB"
    assert decoded.width * decoded.height <= MAX_PIXELS
    assert decoded.bytes == len(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_images_decode_or_are_rejected_cleanly(data: bytes) -> None:
    _decodes_or_is_rejected(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_are_rejected_cleanly(data: bytes) -> None:
    _decodes_or_is_rejected(data)
