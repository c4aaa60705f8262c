"""One deadline for a whole fetch, enforced on every socket operation of the connection it uses.

Connections outlive fetches (they are kept alive for the next image from the same host), so a
connection does not hold a deadline of its own: it reads the one its current fetch put in its
`DeadlineSlot`.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable
from typing import Any

import httpcore

from contract.errors import FetchError, FetchTimeout


class Deadline:
    """One monotonic deadline for a whole fetch, so redirects and slow bodies cannot extend it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._expires = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left; raises once none are, so every caller stops at the same moment."""
        left = self._expires - time.monotonic()
        if left <= 0:
            raise self.expired()
        return left

    def expired(self) -> FetchError:
        return FetchTimeout(f"timed out after {self.seconds:g}s")


class DeadlineSlot:
    """The deadline of the fetch now using a connection; set before each request."""

    def __init__(self) -> None:
        self.deadline = Deadline(0.0)  # nothing runs on a slot no fetch has filled

    def bounded(self, timeout: float | None) -> float:
        """The operation's own timeout, cut to what is left of the fetch's deadline; a socket
        timeout of a hair above zero, once nothing is left, times the operation out at once."""
        try:
            left = self.deadline.remaining()
        except FetchError:
            left = 1e-3
        return left if timeout is None else min(timeout, left)


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read, write and TLS handshake waits at most until the current
    fetch's deadline: a server that drips its response headers a byte at a time (each read
    succeeding) can no longer stretch a fetch past `LV_FETCH_TIMEOUT`."""

    def __init__(self, inner: httpcore.NetworkStream, slot: DeadlineSlot) -> None:
        self._inner = inner
        self._slot = slot

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._slot.bounded(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._slot.bounded(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, self._slot.bounded(timeout))
        return DeadlineStream(inner, self._slot)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's own sockets, wrapped in `DeadlineStream`."""

    def __init__(self, slot: DeadlineSlot) -> None:
        self._inner = httpcore.SyncBackend()
        self._slot = slot

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(
            host, port, self._slot.bounded(timeout), local_address, socket_options
        )
        return DeadlineStream(stream, self._slot)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise FetchError("unix sockets are never fetched")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(min(seconds, self._slot.deadline.remaining()))
