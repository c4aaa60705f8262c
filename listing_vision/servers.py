"""Where the database and the broker are: the configured URLs, or the embedded stack."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from contract.settings import Settings
from listing_vision.embedded import EmbeddedServers


@contextlib.contextmanager
def connected(settings: Settings, *, broker: bool = True) -> Iterator[Settings]:
    """`settings` with both server URLs resolved: the configured ones, else the embedded
    servers', started (or reused) meanwhile. `broker=False` is for commands that only read the
    database (their settings keep a configured broker URL, or none)."""
    need_postgres = settings.database_url is None
    need_valkey = broker and settings.broker_url is None
    if not (need_postgres or need_valkey):
        yield settings
        return
    embedded = EmbeddedServers(settings.home, postgres=need_postgres, valkey=need_valkey)
    with embedded as started:
        yield settings.with_servers(
            settings.database_url or started.database_url,
            settings.broker_url or started.broker_url,
        )
