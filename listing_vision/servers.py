"""Where the database and the broker are: the configured URLs, or the embedded stack."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from listing_vision.embedded import EmbeddedServers, ServerUrls
from listing_vision.settings import Settings


@contextlib.contextmanager
def connected(settings: Settings, *, broker: bool = True) -> Iterator[ServerUrls]:
    """The URLs to use; servers the settings leave unset are started (or reused) meanwhile.

    `broker=False` is for commands that only read the database.
    """
    need_postgres = settings.database_url is None
    need_valkey = broker and settings.broker_url is None
    if not (need_postgres or need_valkey):
        yield ServerUrls(settings.database_url, settings.broker_url)
        return
    embedded = EmbeddedServers(settings.home, postgres=need_postgres, valkey=need_valkey)
    with embedded as started:
        yield ServerUrls(
            settings.database_url or started.database_url,
            settings.broker_url or started.broker_url,
        )
