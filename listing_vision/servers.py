"""Where the database, the broker and the Milvus mirror are: the configured URLs, or the
embedded stack."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from contract.settings import Settings
from listing_vision.embedded import EmbeddedError, EmbeddedServers

log = logging.getLogger(__name__)


@contextlib.contextmanager
def connected(
    settings: Settings, *, broker: bool = True, milvus: bool = False
) -> Iterator[Settings]:
    """`settings` with both server URLs resolved: the configured ones, else the embedded
    servers', started (or reused) meanwhile. `broker=False` is for commands that only read the
    database (their settings keep a configured broker URL, or none). `milvus=True` is for
    processes that write to the mirror: an `LV_MILVUS_URI` path is served by milvus-lite
    (docs/milvus-mirror.md) and resolved to its address."""
    with contextlib.ExitStack() as stack:
        resolved = settings
        need_postgres = settings.database_url is None
        need_valkey = broker and settings.broker_url is None
        if need_postgres or need_valkey:
            embedded = EmbeddedServers(settings.home, postgres=need_postgres, valkey=need_valkey)
            started = stack.enter_context(embedded)
            resolved = settings.with_servers(
                settings.database_url or started.database_url,
                settings.broker_url or started.broker_url,
            )
        path = settings.milvus_lite_path
        if milvus and path is not None:
            from listing_vision.embedded_milvus import EmbeddedMilvus

            try:
                resolved = resolved.with_milvus_uri(stack.enter_context(EmbeddedMilvus(path)))
            except (EmbeddedError, OSError) as error:
                # The mirror is optional: jobs run without it, and it is caught up later.
                log.error("Milvus mirror off in this process: %s", error)
        yield resolved
