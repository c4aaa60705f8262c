"""Fetch one listing image's bytes without letting a listing URL reach our own network.

`http(s)` through the address guard (`addresses`, `http`), `file://` only under the file roots
(`files`); every failure is one line naming the URL.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from contract.errors import FetchError, TransientError, shown
from worker.fetch.files import read_file_url
from worker.fetch.http import fetch_http_url
from worker.fetch.policy import FetchedImage, FetchPolicy

__all__ = ["FetchPolicy", "FetchedImage", "fetch_image"]


def fetch_image(url: str, policy: FetchPolicy) -> FetchedImage:
    """Fetch one image URL under `policy`; every failure is one line naming the URL."""
    try:
        return _fetch(url, policy)
    except FetchError as error:
        raise FetchError(f"image URL {shown(url)}: {error}") from None
    except TransientError as error:
        raise TransientError(f"image URL {shown(url)}: {error}") from None


def _fetch(url: str, policy: FetchPolicy) -> FetchedImage:
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        return read_file_url(url, policy)
    if scheme in ("http", "https"):
        return fetch_http_url(url, policy)
    if not scheme:
        raise FetchError("URL has no scheme (only http, https and file are fetched)")
    raise FetchError(f"unsupported URL scheme {scheme!r} (only http, https and file are fetched)")
