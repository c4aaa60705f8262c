"""The two kinds of failure a job can meet, and how an error reads in one line.

`ListingError`: the listing's own fault (a bad URL, not an image, too large). The job fails at
once with the message as its one-line `error`; retrying cannot help.
`TransientError`: the world's fault (HTTP 503, a reset connection, a database restart). The job is
retried with backoff until `LV_MAX_ATTEMPTS`, then it is `dead`.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_MAX_SHOWN_CHARS = 200


class ListingError(Exception):
    """The listing's own input is bad; fails its job at once and is never retried."""


class FetchError(ListingError):
    """An image URL could not be fetched (refused, unreachable, too slow, too large)."""


class FetchTimeout(FetchError):
    """A fetch ran out of its time (`LV_FETCH_TIMEOUT`, or what was left of its attempt's)."""


class ImageRejected(ListingError):
    """The fetched bytes are not an image we accept (format, size, pixels, corruption)."""


class TransientError(Exception):
    """A failure worth retrying later; after `LV_MAX_ATTEMPTS` the job is dead."""


def one_line(error: BaseException, limit: int = 500) -> str:
    """An exception as one readable line for a `failed` row or a log (no traceback, bounded)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:limit]


def shown(text: str) -> str:
    """Untrusted text (a URL, a server's words) made safe for a one-line message: control
    characters replaced, long values cut."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()
    if len(text) > _MAX_SHOWN_CHARS:
        return text[: _MAX_SHOWN_CHARS - 1] + "…"
    return text


def redacted(url: str) -> str:
    """A URL as it may be shown or logged: no userinfo, query values and fragment hidden.
    Signed image URLs carry their credentials there (`X-Amz-Signature=…`, `token=…`); the
    parameter names stay, so a reader still sees which kind of URL it was."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{pair.split('=', 1)[0]}=…" if "=" in pair else pair
        for pair in parts.query.split("&")
        if pair
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, "…" if parts.fragment else ""))


def reason(error: BaseException) -> str:
    """A short one-line reason: strerror for OS errors, else the message, never a traceback."""
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return shown(str(text))
