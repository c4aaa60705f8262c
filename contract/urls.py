"""Which image URLs a listing may name: the rule the producer checks at enqueue and the worker
applies again when it reads a `file://` URL.

`http` and `https` URLs need a host (where they lead is the worker's address guard's business,
decided at fetch time); `file` URLs must name a regular path under `LV_FILE_ROOTS` after
symlinks and `..` are resolved.
"""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import unquote, urlsplit

from contract.errors import FetchError, reason

MAX_URL_LENGTH = 2048


def url_problem(url: str, file_roots: tuple[Path, ...]) -> str | None:
    """Why an image URL cannot be used (length, scheme, host, a file outside the roots), or None."""
    if len(url) > MAX_URL_LENGTH:
        return f"URL longer than {MAX_URL_LENGTH} characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as error:  # e.g. an unclosed IPv6 bracket
        return f"malformed URL ({error})"
    if parts.scheme in ("http", "https"):
        return None if host else f"URL has no host: {url!r}"
    if parts.scheme != "file":
        return f"URL scheme {parts.scheme or 'missing'!r} is not allowed (http, https or file)"
    try:
        allowed_file_path(url, file_roots)
    except FetchError as error:
        return str(error)
    return None


def allowed_file_path(url: str, file_roots: tuple[Path, ...]) -> Path:
    """The real path a file URL names, if it lies under a file root; `FetchError` otherwise."""
    if not file_roots:
        raise FetchError("file URLs are only read under LV_FILE_ROOTS, and none is configured")
    path = file_url_path(url)
    real = _real_path(path)
    if not any(real.is_relative_to(root) for root in _real_roots(file_roots)):
        raise FetchError(f"file URLs are only read under LV_FILE_ROOTS; {path} is outside them")
    return real


def file_url_path(url: str) -> Path:
    """The absolute path a `file://` URL names (no host but `localhost`)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"file URLs may not name a host ({parts.netloc!r})")
    path = Path(unquote(parts.path))
    if not path.is_absolute():
        raise FetchError("file URLs must hold an absolute path")
    return path


@functools.lru_cache(maxsize=16)
def _real_roots(file_roots: tuple[Path, ...]) -> tuple[Path, ...]:
    """The roots' real paths, resolved once per process: a worker reads every file URL
    through this check, and resolving each root again took a tenth of its fetch threads' time.
    A root re-pointed (a symlink changed) takes effect when the process restarts."""
    return tuple(_real_path(root) for root in file_roots)


def _real_path(path: Path) -> Path:
    """Resolve symlinks and `..`, so a link inside a root cannot point outside it."""
    try:
        return path.resolve()
    except RuntimeError:  # Python 3.11's resolve() raises this for a symlink loop
        raise FetchError(f"invalid file path {path} (a symlink loop)") from None
    except (OSError, ValueError) as error:
        raise FetchError(f"invalid file path {path} ({reason(error)})") from None
