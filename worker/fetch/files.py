"""`file://` image URLs: read only regular files under `LV_FILE_ROOTS`."""

from __future__ import annotations

import os

from contract.errors import FetchError, reason
from contract.urls import allowed_file_path, file_url_path
from worker.fetch.policy import FetchedImage, FetchPolicy, NotModified, Validators, too_large


def read_file_url(
    url: str, policy: FetchPolicy, validators: Validators | None = None
) -> FetchedImage | NotModified:
    """Read a file URL, but only a regular file whose real path lies under a file root; with
    `validators` naming its current size and modification time, `NotModified`."""
    real = allowed_file_path(url, policy.file_roots)
    path = file_url_path(url)
    if not real.exists():
        raise FetchError(f"no such file {path}")
    if not real.is_file():
        raise FetchError(f"{path} is not a regular file")
    try:
        with real.open("rb") as file:
            version = _version(os.fstat(file.fileno()))
            if validators is not None and validators.etag == version.etag:
                return NotModified(url)
            data = file.read(policy.max_bytes + 1)
    except OSError as error:
        raise FetchError(f"cannot read {path} ({reason(error)})") from None
    if len(data) > policy.max_bytes:
        raise FetchError(too_large(policy.max_bytes))
    return FetchedImage(data=data, url=url, content_type=None, validators=version)


def _version(stat: os.stat_result) -> Validators:
    """A file's version, as an ETag would name it: its size and modification time."""
    return Validators(etag=f'"{stat.st_size}-{stat.st_mtime_ns}"')
