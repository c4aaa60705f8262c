"""Turn fetched bytes into RGB pixels, refusing anything unsafe before it is decoded.

Pillow's own decompression-bomb check only warns below 2x its limit, so it is switched off and
the pixel count (`LV_MAX_IMAGE_PIXELS`) is checked here from the header, before `load()`.
Truncated images are errors, never silently padded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from contract.errors import ImageRejected, one_line

# Never EPS/PDF/PSD and friends: only the formats product photos come in.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The pixel limit is LV_MAX_IMAGE_PIXELS, checked from the header in `_check_pixels`; Pillow's own
# global limit would otherwise cap it at 89 Mpx and refuse bigger headers in its own words.
Image.MAX_IMAGE_PIXELS = None
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class DecodedImage:
    """Pixels ready for a model plus the facts stored per image."""

    pixels: Image.Image
    width: int
    height: int
    format: str
    bytes: int


def decode_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> DecodedImage:
    """Decode `data` to an RGB image; raise `ImageRejected` with a readable reason otherwise.

    `draft_size` lets JPEG decode at a reduced scale (at least that many pixels on each side),
    which is several times faster for large photos that the model will shrink anyway.
    """
    if not data:
        raise ImageRejected("image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.UnidentifiedImageError:
        raise ImageRejected(
            f"not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except Exception as error:  # Pillow raises many types for malformed headers
        raise ImageRejected(f"unreadable image header: {one_line(error, 200)}") from None
    width, height = image.size
    image_format = image.format or "unknown"
    _check_pixels(width, height, max_pixels)
    if _orientation(image) in _QUARTER_TURNS:
        width, height = height, width  # the size as displayed, like the pixels
    pixels = _load_rgb(image, draft_size)
    return DecodedImage(pixels, width, height, image_format, len(data))


_QUARTER_TURNS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block: the image is shown as stored
        return 1


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageRejected(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageRejected(
            f"image is {width}x{height} ({width * height / 1e6:.0f} Mpx), over the "
            f"{max_pixels / 1e6:.0f} Mpx limit (LV_MAX_IMAGE_PIXELS)"
        )


def _load_rgb(image: Image.Image, draft_size: int | None) -> Image.Image:
    try:
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # without in_place: always a full copy
        return _to_rgb(image)
    except Exception as error:  # truncated data, bad chunks, broken palettes...
        raise ImageRejected(f"corrupt or truncated image: {one_line(error, 200)}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white, as product photos are shown, and drop other modes."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = _to_8bit(image)
    if "transparency" in image.info and image.mode not in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, _WHITE)
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale to 8-bit by scaling, not clipping (clipping turns mid-grey white)."""
    values = np.asarray(image, dtype=np.uint32)
    top = 65535 if image.mode.startswith("I;16") or values.max() > 255 else 255
    scaled = (values * 255 // max(top, 1)).astype(np.uint8)
    converted = Image.fromarray(scaled, mode="L")
    converted.info = dict(image.info)
    return converted
