"""Kept-alive connections for image fetches, and one verifying TLS context for the process.

A catalogue's images come from a few hosts, so each fetch thread keeps its last few connections
open: the next image from the same host skips the TCP connect and the TLS handshake. Measured on
loopback before this existed (bench/fetch_cost.py, docs/architecture.md "Fetching"): 46.7 ms of
CPU per plain-http fetch, nearly all of it building a verifying TLS context (loading the CA
bundle) that the fetch never used; it is now built once per process.

A connection is keyed by the URL's scheme, hostname and port and the checked address it goes to:
a TLS connection verified for one hostname never serves another name on the same address, and a
name that now resolves elsewhere gets a connection to the new (checked) address. A client is
taken out of its thread's keeping for the length of one fetch and put back only when that fetch
ended cleanly with nothing left unread on the connection; so no connection is shared between
threads or fetches. A sweeper thread closes connections left idle (each thread's keeping has a
lock for that, held only to take, put back or sweep a client).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpcore
import httpx

from worker.fetch.deadline import Deadline, DeadlineBackend, DeadlineSlot

log = logging.getLogger(__name__)

KEPT_PER_THREAD = 4  # connections one fetch thread keeps, least recently used closed first
KEPT_PER_PROCESS = 256  # beyond this many, a fetch's connection is closed when it ends
IDLE_SECONDS = 15.0  # a connection idle longer than this is closed (by the sweeper, or at its
# thread's next fetch, whichever comes first)
DISTRUST_SECONDS = 600.0  # no connection is kept this long for a server that sent bytes unasked

_lock = threading.Lock()
_tls: ssl.SSLContext | None = None
_generation = 0  # bumped by forget_connections: every thread's kept clients are then dropped
_kept = 0  # clients kept (between fetches) in all threads
_distrusted: dict[ConnectionKey, float] = {}  # key -> until (monotonic); under _lock
_PLAIN = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # http's pools need one; it is never used


@dataclass(frozen=True)
class ConnectionKey:
    """What a kept connection may serve."""

    scheme: str
    hostname: str  # the URL's host: TLS verified it, and the Host header names it
    address: str  # the checked IP the connection goes to
    port: int


class KeptClient:
    """An httpx client holding at most one kept-alive connection for one `ConnectionKey`."""

    def __init__(self, key: ConnectionKey) -> None:
        self.key = key
        self.slot = DeadlineSlot()
        self.last_used = time.monotonic()
        self._tls = tls_context() if key.scheme == "https" else _PLAIN
        self.http = self._client()

    def _client(self) -> httpx.Client:
        transport = httpx.HTTPTransport(verify=self._tls, trust_env=False)
        # httpx takes no network backend, so its pool is replaced (the constructor httpx calls).
        transport._pool = httpcore.ConnectionPool(
            ssl_context=self._tls,
            max_connections=1,
            keepalive_expiry=IDLE_SECONDS,
            network_backend=DeadlineBackend(self.slot),
        )
        return httpx.Client(
            transport=transport,
            trust_env=False,  # a proxy from the environment would connect to the name, not the IP
            follow_redirects=False,
            timeout=None,  # the slot's deadline bounds every socket operation instead
        )

    def holds_live_connection(self) -> bool:
        """Whether the next request will go out on a connection kept from an earlier one (an
        idle one the server has not visibly closed), not on a new one."""
        return any(c.is_idle() and not c.has_expired() for c in self._pool().connections)

    def left_clean(self) -> bool:
        """Whether the connection holds no bytes beyond the responses read from it: a server that
        sent more than its Content-Length would otherwise answer the next fetch with them. Where
        httpcore's insides are not as expected, the connection counts as unclean (closed, never
        reused: slower, never wrong)."""
        for connection in self._pool().connections:
            h11_state = getattr(getattr(connection, "_connection", None), "_h11_state", None)
            trailing = getattr(h11_state, "trailing_data", None)
            if not isinstance(trailing, tuple) or trailing[0]:
                return False
        return True

    def sent_unasked(self) -> bool:
        """Whether the server sent bytes on the idle kept connection since its last response
        (read and dropped here: the connection is closed either way). A server's close of an
        idle connection reads as nothing; anything else would be read as the next fetch's
        answer."""
        for connection in self._pool().connections:
            stream = getattr(getattr(connection, "_connection", None), "_network_stream", None)
            if stream is None or not connection.is_idle():
                continue
            if not stream.get_extra_info("is_readable"):
                continue
            try:
                return bool(stream.read(1, 0.001))
            except Exception:  # reset, a partial TLS record, a timeout: no answer anyway
                return False
        return False

    def renew(self) -> None:
        """A new connection for the next request (the kept one turned out to be dead)."""
        self.http.close()
        self.http = self._client()

    def close(self) -> None:
        self.http.close()

    def _pool(self) -> httpcore.ConnectionPool:
        pool = self.http._transport._pool  # type: ignore[attr-defined]
        assert isinstance(pool, httpcore.ConnectionPool)
        return pool


class _ThreadClients:
    """One thread's kept clients; closed when the thread ends or the generation changes, and
    swept of idle ones from the sweeper's thread (hence the lock: only ever held briefly)."""

    def __init__(self) -> None:
        self.generation = _generation
        self.clients: OrderedDict[ConnectionKey, KeptClient] = OrderedDict()
        self.lock = threading.Lock()
        weakref.finalize(self, _close_all, self.clients)


_local = threading.local()
_holders: weakref.WeakSet[_ThreadClients] = weakref.WeakSet()  # under _lock
_sweeper: threading.Thread | None = None


@contextmanager
def kept_client(key: ConnectionKey, deadline: Deadline) -> Iterator[KeptClient]:
    """This thread's client for `key` (a new one if none is kept), its slot holding `deadline`,
    for one fetch; kept again afterwards only if the fetch raised nothing and the connection was
    left clean."""
    holder = _thread_holder()
    with holder.lock:
        _close_idle(holder.clients)
        client = holder.clients.pop(key, None)
    if client is not None:
        _count(-1)
        if client.sent_unasked():
            client.close()
            client = None
            _distrust(key)
    if client is None:
        client = KeptClient(key)
        _start_sweeper()
    client.slot.deadline = deadline
    try:
        yield client
    except BaseException:
        client.close()  # whatever went wrong, the next fetch starts a fresh connection
        raise
    with holder.lock:
        _keep(holder.clients, client)


def sweep_idle() -> None:
    """Close every thread's connections idle past IDLE_SECONDS: a worker that stops fetching
    would otherwise hold them (in CLOSE-WAIT once servers close their end) until it fetches."""
    with _lock:
        holders = list(_holders)
    for holder in holders:
        with holder.lock:
            _close_idle(holder.clients)


def _start_sweeper() -> None:
    global _sweeper
    with _lock:
        if _sweeper is not None and _sweeper.is_alive():
            return
        _sweeper = threading.Thread(target=_sweep_forever, name="fetch-sweeper", daemon=True)
        _sweeper.start()


def _sweep_forever() -> None:
    while True:
        time.sleep(IDLE_SECONDS)
        try:
            sweep_idle()
        except Exception:  # a sweep must never end the sweeping
            log.exception("closing idle image connections failed")


def tls_context() -> ssl.SSLContext:
    """The process's verifying context, built on first use (loading the CA bundle costs about
    40 ms of CPU). Sharing it is what one httpx client does across its own connections:
    httpcore sets the same ALPN protocols on it before each handshake, under the GIL."""
    global _tls
    with _lock:
        if _tls is None:
            _tls = _new_tls_context()
        return _tls


def _new_tls_context() -> ssl.SSLContext:
    return httpx.create_ssl_context(trust_env=False)


def kept_count() -> int:
    """Clients kept between fetches in all threads (connections open, or about to be)."""
    with _lock:
        return _kept


def forget_connections() -> None:
    """Drop the TLS context and every thread's kept connections (tests change what is trusted;
    each other thread closes its own clients at its next fetch)."""
    global _tls, _generation
    with _lock:
        _tls = None
        _generation += 1
        _distrusted.clear()
    _thread_holder()


def _keep(clients: OrderedDict[ConnectionKey, KeptClient], client: KeptClient) -> None:
    clean = client.left_clean()
    if not clean:
        _distrust(client.key)
    if not clean or kept_count() >= KEPT_PER_PROCESS or distrusted(client.key):
        client.close()
        return
    client.last_used = time.monotonic()
    clients[client.key] = client  # the most recently used is last
    _count(+1)
    while len(clients) > KEPT_PER_THREAD:
        _, oldest = clients.popitem(last=False)
        oldest.close()
        _count(-1)


def distrusted(key: ConnectionKey) -> bool:
    """Whether connections for `key` are not kept (its server sent bytes nobody asked for)."""
    with _lock:
        until = _distrusted.get(key)
        if until is not None and until <= time.monotonic():
            del _distrusted[key]
            until = None
    return until is not None


def _distrust(key: ConnectionKey) -> None:
    """HTTP/1.1 has no way to tell an answer from stray bytes sent before it: a server that sent
    some once gets a new connection per fetch for a while. Any fetch whose answer arrived on that
    connection between the stray bytes' sending and their detection may hold them instead."""
    with _lock:
        first = key not in _distrusted
        _distrusted[key] = time.monotonic() + DISTRUST_SECONDS
    if first:
        log.warning(
            "host %s (%s port %d) sent bytes nobody asked for on a kept connection: its "
            "connections are not kept for %.0f min (the image fetched on it just before may be "
            "another's)",
            key.hostname,
            key.address,
            key.port,
            DISTRUST_SECONDS / 60,
        )


def _close_idle(clients: OrderedDict[ConnectionKey, KeptClient]) -> None:
    """Close this thread's clients idle past IDLE_SECONDS: the server has most likely closed
    its end, and the socket would otherwise wait in CLOSE-WAIT until the client is next used."""
    now = time.monotonic()
    while clients:
        key, oldest = next(iter(clients.items()))
        if now - oldest.last_used <= IDLE_SECONDS:
            return
        del clients[key]
        oldest.close()
        _count(-1)


def _close_all(clients: OrderedDict[ConnectionKey, KeptClient]) -> None:
    for client in clients.values():
        client.close()
    _count(-len(clients))
    clients.clear()


def _count(change: int) -> None:
    global _kept
    with _lock:
        _kept += change


def _thread_holder() -> _ThreadClients:
    holder: _ThreadClients | None = getattr(_local, "holder", None)
    if holder is None or holder.generation != _generation:
        if holder is not None:
            with holder.lock:
                _close_all(holder.clients)
        holder = _local.holder = _ThreadClients()
        with _lock:
            _holders.add(holder)
    return holder
