"""Fetch one listing image's bytes without letting a listing URL reach our own network.

`http(s)` through the address guard (`addresses`, `http`), `file://` only under the file roots
(`files`); every failure is one line naming the URL.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from contract.errors import FetchError, TransientError, redacted, shown
from worker.fetch.files import read_file_url
from worker.fetch.http import fetch_http_url
from worker.fetch.policy import FetchedImage, FetchPolicy, NotModified, Validators

__all__ = ["FetchPolicy", "FetchedImage", "NotModified", "Validators", "fetch_image"]


def fetch_image(
    url: str, policy: FetchPolicy, validators: Validators | None = None
) -> FetchedImage | NotModified:
    """Fetch one image URL under `policy`; every failure is one line naming the URL. With
    `validators` (from an earlier fetch) the request is conditional: `NotModified` when the
    image is still that version."""
    try:
        return _fetch(url, policy, validators)
    except FetchError as error:  # the same kind (a timeout stays a timeout), with its URL
        raise type(error)(f"image URL {shown(redacted(url))}: {error}") from None
    except TransientError as error:
        raise TransientError(f"image URL {shown(redacted(url))}: {error}") from None


def _fetch(
    url: str, policy: FetchPolicy, validators: Validators | None
) -> FetchedImage | NotModified:
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        return read_file_url(url, policy, validators)
    if scheme in ("http", "https"):
        return fetch_http_url(url, policy, validators)
    if not scheme:
        raise FetchError("URL has no scheme (only http, https and file are fetched)")
    raise FetchError(f"unsupported URL scheme {scheme!r} (only http, https and file are fetched)")
