"""Kept-alive connections for image fetches, and one verifying TLS context for the process.

A catalogue's images come from a few hosts, so each fetch thread keeps its last few connections
open: the next image from the same host skips the TCP connect and the TLS handshake. Measured on
loopback before this existed (bench/results/2026-12-02-fetch-cpu-x86-64.json): 42 ms of CPU per
plain-http fetch, nearly all of it building a verifying TLS context (loading the CA bundle) that
the fetch never used; it is now built once per process.

A connection is keyed by the URL's scheme, hostname and port and the checked address it goes to:
a TLS connection verified for one hostname never serves another name on the same address, and a
name that now resolves elsewhere gets a connection to the new (checked) address. The clients are
per thread, so no connection is shared between threads and no lock is needed.
"""

from __future__ import annotations

import ssl
import threading
from collections import OrderedDict
from dataclasses import dataclass

import httpcore
import httpx

from worker.fetch.deadline import Deadline, DeadlineBackend, DeadlineSlot

KEPT_HOSTS = 8  # connections one fetch thread keeps open, least recently used closed first
IDLE_SECONDS = 15.0  # a connection idle longer than this is closed, never reused

_lock = threading.Lock()
_tls: ssl.SSLContext | None = None
_generation = 0  # bumped by forget_connections: every thread's kept clients are then dropped
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
        self.slot = DeadlineSlot()
        self.requests = 0  # sent on this client: after the first, the connection may be stale
        tls = tls_context() if key.scheme == "https" else _PLAIN
        transport = httpx.HTTPTransport(verify=tls, trust_env=False)
        # httpx takes no network backend, so its pool is replaced (the constructor httpx calls).
        transport._pool = httpcore.ConnectionPool(
            ssl_context=tls,
            max_connections=1,
            keepalive_expiry=IDLE_SECONDS,
            network_backend=DeadlineBackend(self.slot),
        )
        self.http = httpx.Client(
            transport=transport,
            trust_env=False,  # a proxy from the environment would connect to the name, not the IP
            follow_redirects=False,
            timeout=None,  # the slot's deadline bounds every socket operation instead
        )

    def close(self) -> None:
        self.http.close()


class _ThreadClients(threading.local):
    def __init__(self) -> None:
        self.generation = _generation
        self.clients: OrderedDict[ConnectionKey, KeptClient] = OrderedDict()


_local = _ThreadClients()


def client_for(key: ConnectionKey, deadline: Deadline) -> KeptClient:
    """This thread's client for `key` (made if none is kept), its slot holding `deadline`."""
    clients = _thread_clients()
    client = clients.pop(key, None)
    if client is None:
        client = KeptClient(key)
    clients[key] = client  # the most recently used is last
    while len(clients) > KEPT_HOSTS:
        _, oldest = clients.popitem(last=False)
        oldest.close()
    client.slot.deadline = deadline
    return client


def drop(key: ConnectionKey) -> None:
    """Close this thread's client for `key`: after any failure its connection is not trusted."""
    client = _thread_clients().pop(key, None)
    if client is not None:
        client.close()


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


def forget_connections() -> None:
    """Drop the TLS context and every thread's kept connections (tests change what is trusted;
    each thread closes its own clients at its next fetch)."""
    global _tls, _generation
    with _lock:
        _tls = None
        _generation += 1
    _thread_clients()


def _thread_clients() -> OrderedDict[ConnectionKey, KeptClient]:
    if _local.generation != _generation:
        for client in _local.clients.values():
            client.close()
        _local.clients.clear()
        _local.generation = _generation
    return _local.clients
