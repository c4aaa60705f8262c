"""The two kinds of failure a job can meet, and how each is handled.

`ListingError`: the listing's own fault (a bad URL, not an image, too large). The job fails at
once with the message as its one-line `error`; retrying cannot help.
`TransientError`: the world's fault (HTTP 503, a reset connection, a database restart). The job is
retried with backoff until `LV_MAX_ATTEMPTS`, then it is `dead`.
"""


class ListingError(Exception):
    """The listing's own input is bad; fails its job at once and is never retried."""


class FetchError(ListingError):
    """An image URL could not be fetched (refused, unreachable, too slow, too large)."""


class ImageRejected(ListingError):
    """The fetched bytes are not an image we accept (format, size, pixels, corruption)."""


class TransientError(Exception):
    """A failure worth retrying later; after `LV_MAX_ATTEMPTS` the job is dead."""


def one_line(error: BaseException, limit: int = 500) -> str:
    """An exception as one readable line for a `failed` row or a log (no traceback, bounded)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:limit]
