"""`file://` image URLs: read only regular files under `LV_FILE_ROOTS`."""

from __future__ import annotations

import errno
import os
from stat import S_ISREG
from typing import BinaryIO

from contract.errors import FetchError, reason
from contract.urls import allowed_file_path, file_url_path
from worker.fetch.policy import FetchedImage, FetchPolicy, NotModified, Validators, too_large

# What `Path.exists()` took for "no such file".
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})


def read_file_url(
    url: str, policy: FetchPolicy, validators: Validators | None = None
) -> FetchedImage | NotModified:
    """Read a file URL, but only a regular file whose real path lies under a file root; with
    `validators` naming its current size and modification time, `NotModified`."""
    real = allowed_file_path(url, policy.file_roots)
    path = file_url_path(url)
    try:
        found = real.stat()  # one system call for what exists() and is_file() asked in two
    except OSError as error:
        if error.errno in _MISSING:
            raise FetchError(f"no such file {path}") from None
        raise FetchError(f"cannot read {path} ({reason(error)})") from None
    if not S_ISREG(found.st_mode):
        raise FetchError(f"{path} is not a regular file")
    try:
        with real.open("rb") as file:
            stat = os.fstat(file.fileno())
            version = _version(stat)
            if validators is not None and validators.etag == version.etag:
                return NotModified(url)
            data = _read_up_to(file, stat.st_size, policy.max_bytes + 1)
    except OSError as error:
        raise FetchError(f"cannot read {path} ({reason(error)})") from None
    if len(data) > policy.max_bytes:
        raise FetchError(too_large(policy.max_bytes))
    return FetchedImage(data=data, url=url, content_type=None, validators=version)


def _read_up_to(file: BinaryIO, size: int, limit: int) -> bytes:
    """At most `limit` bytes. `read(limit)` would allocate `limit` bytes (LV_MAX_IMAGE_BYTES)
    for every small image; the file's size is asked for first, and a file that grew since is
    read on up to the limit."""
    data = file.read(min(size + 1, limit))
    if len(data) > size and len(data) < limit:
        data += file.read(limit - len(data))
    return data


def _version(stat: os.stat_result) -> Validators:
    """A file's version, as an ETag would name it: its size and modification time."""
    return Validators(etag=f'"{stat.st_size}-{stat.st_mtime_ns}"')
