"""How far one fetch may go, and what a fetch hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from contract.settings import IPNetwork


@dataclass(frozen=True)
class FetchPolicy:
    """How far one fetch may go.

    max_bytes: largest image accepted, checked against Content-Length and while streaming.
    timeout: seconds for the whole fetch (DNS, connect, every redirect, the body), not per step.
    allowed_private_networks: non-public networks that may still be fetched from (default none).
    file_roots: directories `file://` URLs may be read under; empty refuses every file URL.
    max_redirects: redirects followed before giving up (default 5).
    user_agent: sent with every request (default "listing-vision/0.1").
    """

    max_bytes: int
    timeout: float
    allowed_private_networks: tuple[IPNetwork, ...] = ()
    file_roots: tuple[Path, ...] = ()
    max_redirects: int = 5
    user_agent: str = "listing-vision/0.1"


@dataclass(frozen=True)
class Validators:
    """What identifies a version of an image for a conditional request: the server's ETag
    and Last-Modified (for a file, its size and modification time)."""

    etag: str | None = None
    last_modified: str | None = None


@dataclass(frozen=True)
class FetchedImage:
    """The raw bytes of one image, the URL they came from after redirects, its Content-Type,
    and the validators a later conditional request can send."""

    data: bytes
    url: str
    content_type: str | None
    validators: Validators = field(default_factory=Validators)


@dataclass(frozen=True)
class NotModified:
    """A conditional request's answer: the image is the version the validators name."""

    url: str


def too_large(max_bytes: int) -> str:
    """The one-line reason for an image over the byte limit."""
    return f"image is larger than the {_size(max_bytes)} limit"


def _size(n: int) -> str:
    """Decimal units, as LV_MAX_IMAGE_BYTES is documented (20000000 is "20 MB")."""
    if n >= 1_000_000:
        return f"{round(n / 1_000_000, 1):g} MB"
    if n >= 1_000:
        return f"{round(n / 1_000, 1):g} KB"
    return f"{n} bytes"
