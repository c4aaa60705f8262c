"""`file://` image URLs: read only regular files under `LV_FILE_ROOTS`."""

from __future__ import annotations

from contract.errors import FetchError, reason
from contract.urls import allowed_file_path, file_url_path
from worker.fetch.policy import FetchedImage, FetchPolicy, too_large


def read_file_url(url: str, policy: FetchPolicy) -> FetchedImage:
    """Read a file URL, but only a regular file whose real path lies under a file root."""
    real = allowed_file_path(url, policy.file_roots)
    path = file_url_path(url)
    if not real.exists():
        raise FetchError(f"no such file {path}")
    if not real.is_file():
        raise FetchError(f"{path} is not a regular file")
    try:
        with real.open("rb") as file:
            data = file.read(policy.max_bytes + 1)
    except OSError as error:
        raise FetchError(f"cannot read {path} ({reason(error)})") from None
    if len(data) > policy.max_bytes:
        raise FetchError(too_large(policy.max_bytes))
    return FetchedImage(data=data, url=url, content_type=None)
