"""Real image files for tests: good ones in several formats and every kind of bad one."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw


def product_image(
    color: str, shape: str = "circle", size: tuple[int, int] = (96, 80)
) -> Image.Image:
    """A coloured shape on white, varied enough that a tiny model tells them apart."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    box = (10, 10, size[0] - 10, size[1] - 10)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(size[0] // 2, 8), (8, size[1] - 8), (size[0] - 8, size[1] - 8)], fill=color)
    return image


def save(image: Image.Image, path: Path, format: str = "JPEG") -> Path:
    image.save(path, format=format, quality=92)
    return path


def truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    product_image("orange").save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A tiny file whose header declares a huge image: the decompression-bomb shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )
    return path


def noisy_png(path: Path, side: int) -> Path:
    """An incompressible PNG, for byte-size limits."""
    import os

    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(path, format="PNG")
    return path
