"""worker.decode: bytes to RGB pixels, refusing corrupt, foreign and oversized images."""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from contract.errors import ImageRejected, ListingError
from worker.decode import ALLOWED_FORMATS, decode_image

MAX_PIXELS = 40_000_000


def encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def noisy_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG whose scan data is most of the file, so cutting it in half cuts the pixels."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def png_declaring(width: int, height: int) -> bytes:
    """A 1-bit PNG whose IHDR (with a correct CRC) claims `width`x`height`; data is 8x8."""
    data = encode(Image.new("1", (8, 8)), "PNG")
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    chunk = struct.pack(">I", 13) + b"IHDR" + header + crc
    return data[:8] + chunk + data[33:]


def gif_declaring(width: int, height: int) -> bytes:
    """A GIF whose logical screen claims `width`x`height` (Pillow's image size)."""
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def rejected(data: bytes, **options: Any) -> str:
    options.setdefault("max_pixels", MAX_PIXELS)
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, **options)
    return str(caught.value)


def rgb(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(image)[y, x])  # type: ignore[return-value]


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every full decode (`ImageFile.load`) made while the test runs."""
    calls: list[str] = []
    real_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> Any:
        calls.append(f"{self.format} {self.size}")
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


# --- what is accepted ------------------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_each_allowed_format_decodes_to_rgb(image_format: str) -> None:
    data = encode(Image.new("RGB", (12, 8), (0, 0, 255)), image_format)

    decoded = decode_image(data, max_pixels=MAX_PIXELS)

    assert decoded.format == image_format
    assert decoded.pixels.mode == "RGB"
    assert (decoded.width, decoded.height) == (12, 8) == decoded.pixels.size
    red, green, blue = rgb(decoded.pixels, 5, 4)
    assert red < 10 and green < 10 and blue > 240


def test_bytes_describe_the_input() -> None:
    data = noisy_jpeg(32, 32)

    decoded = decode_image(data, max_pixels=MAX_PIXELS)

    assert decoded.bytes == len(data)


def test_grayscale_becomes_rgb_with_the_same_value() -> None:
    decoded = decode_image(encode(Image.new("L", (4, 4), 128), "PNG"), max_pixels=MAX_PIXELS)

    assert decoded.pixels.mode == "RGB"
    assert rgb(decoded.pixels, 0, 0) == (128, 128, 128)


def test_sixteen_bit_grayscale_keeps_its_brightness() -> None:
    image = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))  # 50 % grey in 16 bits
    assert image.mode == "I;16"

    decoded = decode_image(encode(image, "PNG"), max_pixels=MAX_PIXELS)

    assert rgb(decoded.pixels, 0, 0) == pytest.approx((128, 128, 128), abs=2)


def test_rgba_is_flattened_onto_white() -> None:
    image = Image.new("RGBA", (3, 1), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue
    image.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black

    pixels = decode_image(encode(image, "PNG"), max_pixels=MAX_PIXELS).pixels

    assert pixels.mode == "RGB"
    assert rgb(pixels, 0, 0) == (255, 255, 255)
    assert rgb(pixels, 1, 0) == pytest.approx((127, 127, 127), abs=1)
    assert rgb(pixels, 2, 0) == (255, 0, 0)


def test_grayscale_with_alpha_is_flattened_onto_white() -> None:
    pixels = decode_image(
        encode(Image.new("LA", (2, 2), (0, 0)), "PNG"), max_pixels=MAX_PIXELS
    ).pixels

    assert rgb(pixels, 1, 1) == (255, 255, 255)


@pytest.mark.parametrize("image_format", ["PNG", "GIF"])
def test_palette_transparency_is_flattened_onto_white(image_format: str) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)  # index 1 is the transparent one

    pixels = decode_image(encode(image, image_format, transparency=1), max_pixels=MAX_PIXELS).pixels

    assert rgb(pixels, 0, 0) == (0, 255, 0)
    assert rgb(pixels, 1, 0) == (255, 255, 255)


@pytest.mark.parametrize(("mode", "background"), [("RGB", (0, 0, 0)), ("L", 0)])
def test_colour_key_transparency_is_flattened_onto_white(mode: str, background: Any) -> None:
    image = Image.new(mode, (4, 4), background)
    data = encode(image, "PNG", transparency=background)  # the background colour is see-through

    pixels = decode_image(data, max_pixels=MAX_PIXELS).pixels

    assert rgb(pixels, 1, 1) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)

    decoded = decode_image(data, max_pixels=MAX_PIXELS)

    assert decoded.format == "JPEG"
    assert decoded.pixels.mode == "RGB"
    red, green, blue = rgb(decoded.pixels, 8, 8)
    assert red > 240 and green < 15 and blue < 15


def test_exif_orientation_is_applied_to_the_pixels_and_to_the_reported_size() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # the left quarter is blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display

    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()), max_pixels=MAX_PIXELS)

    assert decoded.pixels.size == (20, 40)
    assert (decoded.width, decoded.height) == (20, 40)  # as displayed (issue 14)
    assert rgb(decoded.pixels, 10, 2)[2] > 200  # the blue edge is now on top
    assert rgb(decoded.pixels, 10, 37)[0] > 200


def test_a_photo_with_one_malformed_exif_tag_still_decodes() -> None:
    # one IFD entry: ImageDescription, 100 ASCII bytes at offset 4000, far past the EXIF block
    entry = struct.pack("<HHII", 0x010E, 2, 100, 4000)
    ifd = struct.pack("<H", 1) + entry + struct.pack("<I", 0)
    exif = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd
    data = encode(Image.new("RGB", (16, 16), (255, 0, 0)), "JPEG", exif=exif)
    with pytest.warns(UserWarning, match="Skipping tag"):  # Pillow warns, skips it, decodes
        assert Image.open(io.BytesIO(data)).convert("RGB").size == (16, 16)

    decoded = decode_image(data, max_pixels=MAX_PIXELS)

    assert decoded.pixels.size == (16, 16)


def test_draft_size_decodes_a_large_jpeg_smaller_but_reports_its_size() -> None:
    data = noisy_jpeg(2000, 1600)

    drafted = decode_image(data, max_pixels=MAX_PIXELS, draft_size=224)
    full = decode_image(data, max_pixels=MAX_PIXELS)

    assert (drafted.width, drafted.height) == (2000, 1600)
    assert full.pixels.size == (2000, 1600)
    width, height = drafted.pixels.size
    assert 224 <= width < 2000 and 224 <= height < 1600  # never below the size asked for
    assert drafted.pixels.mode == "RGB"


def test_draft_size_leaves_other_formats_at_full_size() -> None:
    data = encode(Image.new("RGB", (800, 600)), "PNG")

    assert decode_image(data, max_pixels=MAX_PIXELS, draft_size=100).pixels.size == (800, 600)


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "lime", "blue")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)

    decoded = decode_image(data, max_pixels=MAX_PIXELS)

    assert decoded.format == "GIF"
    assert rgb(decoded.pixels, 4, 4) == (255, 0, 0)


# --- what is refused -------------------------------------------------------------------------


def test_image_rejected_is_a_listing_error() -> None:
    assert issubclass(ImageRejected, ListingError)


def test_empty_bytes_are_refused() -> None:
    assert "empty" in rejected(b"")


def test_truncated_jpeg_is_rejected_as_corrupt() -> None:
    data = noisy_jpeg(256, 256)

    message = rejected(data[: len(data) // 2])

    assert "corrupt or truncated" in message


def test_jpeg_cut_inside_its_header_is_rejected_as_truncated() -> None:
    data = noisy_jpeg(64, 64)

    assert "truncated" in rejected(data[:200]).lower()


def test_truncated_png_is_rejected_as_corrupt() -> None:
    data = encode(Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)), "PNG")

    assert "corrupt or truncated" in rejected(data[: len(data) - 40])


@pytest.mark.parametrize(
    "data",
    [
        os.urandom(4096),
        b"<html><body>404 Not Found</body></html>\n" * 20,
        b'{"error": "not found"}',
        b"\xff\xd8",  # the first two bytes of a JPEG and nothing else
    ],
    ids=["random-bytes", "html", "json", "jpeg-magic-only"],
)
def test_bytes_that_are_not_an_image_are_refused(data: bytes) -> None:
    assert "not an image" in rejected(data)


@pytest.mark.parametrize("image_format", ["ICO", "PCX", "TGA", "EPS", "PPM", "SGI", "QOI"])
def test_a_format_pillow_reads_but_we_do_not_allow_is_refused(image_format: str) -> None:
    data = encode(Image.new("RGB", (16, 16), (255, 0, 0)), image_format)
    assert Image.open(io.BytesIO(data)).size == (16, 16)  # Pillow itself would read it

    message = rejected(data)

    assert "not an image in an accepted format" in message
    assert all(allowed in message for allowed in ALLOWED_FORMATS)


@pytest.mark.parametrize("declaring", [png_declaring, gif_declaring], ids=["png", "gif"])
def test_too_many_pixels_are_refused_from_the_header(
    declaring: Any, decode_calls: list[str]
) -> None:
    message = rejected(declaring(7000, 7000))

    assert "7000x7000" in message
    assert "40 Mpx limit" in message
    assert "LV_MAX_IMAGE_PIXELS" in message
    assert decode_calls == []


def test_a_real_pixel_bomb_png_is_refused_before_decoding(decode_calls: list[str]) -> None:
    # a genuine 49 Mpx 1-bit PNG: a few KB on the wire, hundreds of MB once decoded to RGB
    data = encode(Image.new("1", (7000, 7000)), "PNG")
    assert len(data) < 50_000

    message = rejected(data)

    assert "49 Mpx" in message and "40 Mpx limit" in message
    assert decode_calls == []


def test_the_pixel_limit_is_the_one_passed_in() -> None:
    data = png_declaring(100, 100)

    assert "LV_MAX_IMAGE_PIXELS" in rejected(data, max_pixels=9_999)
    # exactly at the limit the header passes; the fake 8x8 data then fails to decode
    assert "corrupt or truncated" in rejected(data, max_pixels=10_000)


def test_the_decode_spy_sees_a_full_decode(decode_calls: list[str]) -> None:
    decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), max_pixels=MAX_PIXELS)

    assert decode_calls[0] == "PNG (4, 4)"  # so an empty list above means "never decoded"


def test_a_gigapixel_header_is_refused(decode_calls: list[str]) -> None:
    rejected(png_declaring(30_000, 30_000))

    assert decode_calls == []


def test_a_gigapixel_header_is_refused_naming_our_mpx_limit() -> None:
    message = rejected(png_declaring(30_000, 30_000))

    assert "40 Mpx limit" in message
    assert "LV_MAX_IMAGE_PIXELS" in message


def test_an_image_under_a_raised_pixel_limit_is_not_called_a_bomb() -> None:
    # 100 Mpx declared, 150 Mpx allowed: the header passes; the (fake) data then fails to decode
    message = rejected(png_declaring(10_000, 10_000), max_pixels=150_000_000)

    assert "bomb" not in message
    assert "corrupt or truncated" in message
