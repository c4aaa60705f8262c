"""The address guard: which IP addresses a listing's image may be fetched from.

Image URLs come from sellers, so every fetch is an SSRF risk (OWASP SSRF cheat sheet): a host is
resolved here, and every address it resolves to must be public (or inside a network the
deployment allows) before anything connects to it.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import OrderedDict
from typing import Any

from contract.errors import FetchError, FetchTimeout, TransientError, reason
from contract.settings import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_BLOCKED_HINT = "(blocked; see LV_ALLOWED_PRIVATE_NETWORKS)"

ANSWER_SECONDS = 30.0  # a host's resolved addresses are reused this long (as a browser does)
_KEPT_ANSWERS = 4096
_answers: OrderedDict[tuple[str, int], tuple[float, list[IPAddress]]] = OrderedDict()
_answers_lock = threading.Lock()


def check_address(address: IPAddress, allowed: tuple[IPNetwork, ...]) -> None:
    """Raise FetchError unless the address is globally routable or inside an allowed network."""
    kind = _blocked_kind(address, allowed)
    if kind is not None:
        raise FetchError(f"{address} is {kind} {_BLOCKED_HINT}")


def resolve_checked(
    host: str, port: int, allowed: tuple[IPNetwork, ...], timeout: float | None = None
) -> list[IPAddress]:
    """Resolve host (getaddrinfo) and check EVERY address; refuse if any is non-public.

    Networks in `allowed` count as public. All addresses are checked, not just the first, because
    the caller may fall back to any of them; `timeout` bounds the lookup (None: no bound).
    """
    literal = _literal_address(host)
    if literal is not None:
        check_address(literal, allowed)
        return [literal]
    addresses = _resolve(host, port, timeout)
    for address in addresses:
        kind = _blocked_kind(address, allowed)
        if kind is not None:
            raise FetchError(f"{host} resolves to {address}, {kind} {_BLOCKED_HINT}")
    return addresses


def _blocked_kind(address: IPAddress, allowed: tuple[IPNetwork, ...]) -> str | None:
    """Why the address must not be fetched from ("a private address"), or None if it may be."""
    unwrapped = _unmapped(address)
    if any(candidate in network for candidate in {address, unwrapped} for network in allowed):
        return None
    for candidate in _judged_forms(unwrapped):
        kind = _non_public_kind(candidate)
        if kind is None:
            continue
        if candidate == unwrapped:
            return kind
        return f"an address embedding {candidate}, {kind}"
    return None


def _unmapped(address: IPAddress) -> IPAddress:
    """`::ffff:10.0.0.1` is a socket to 10.0.0.1, so it is judged as that IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _judged_forms(address: IPAddress) -> list[IPAddress]:
    """The address itself plus any IPv4 address a 6to4 or NAT64 gateway would forward it to."""
    if not isinstance(address, ipaddress.IPv6Address):
        return [address]
    if address in _NAT64:
        # Python calls all of ::/8 reserved, but 64:ff9b::/96 is how IPv6-only hosts reach the
        # IPv4 internet, so only the embedded IPv4 address decides.
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    if address.sixtofour is not None:
        return [address, address.sixtofour]
    return [address]


def _non_public_kind(address: IPAddress) -> str | None:
    """Name the kind of non-public address, most specific first; None for a global one."""
    # is_global alone misses multicast (Python counts 224.0.0.0/4 as global) and the
    # loopback/link-local cases deserve their own name in the operator's message.
    checks = (
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_unspecified, "an unspecified address"),
        (address.is_multicast, "a multicast address"),
        (address in _CGNAT, "a shared (CGNAT) address"),
        (address.is_reserved, "a reserved address"),
        (address.is_private, "a private address"),
        (not address.is_global, "a non-public address"),
    )
    return next((kind for matched, kind in checks if matched), None)


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolve(host: str, port: int, timeout: float | None) -> list[IPAddress]:
    """The host's addresses, as resolved within the last `ANSWER_SECONDS`: one lookup costs a
    thread and about 0.5 ms of CPU here (more on a real resolver's round trip), and a catalogue's
    images come from a few hosts. Keeping an answer is safe: every address is checked again at
    each fetch, and the connection goes only to a checked one."""
    key = (host.lower(), port)
    now = time.monotonic()
    with _answers_lock:
        kept = _answers.get(key)
    if kept is not None and kept[0] > now:
        return kept[1]
    addresses = _look_up(host, port, timeout)
    with _answers_lock:
        _answers[key] = (now + ANSWER_SECONDS, addresses)
        _answers.move_to_end(key)
        while len(_answers) > _KEPT_ANSWERS:
            _answers.popitem(last=False)
    return addresses


def forget_answer(host: str, port: int) -> None:
    """Drop the kept answer for one host: none of its addresses answered, and a fresh lookup
    may name new ones (a host moved off a dead address is not refused for the answer's life)."""
    with _answers_lock:
        _answers.pop((host.lower(), port), None)


def forget_answers() -> None:
    """Drop every kept answer (tests change what names resolve to)."""
    with _answers_lock:
        _answers.clear()


def _look_up(host: str, port: int, timeout: float | None) -> list[IPAddress]:
    """getaddrinfo in a daemon thread: it has no timeout of its own and may block for seconds."""
    found: list[list[IPAddress]] = []
    errors: list[Exception] = []

    def run() -> None:
        try:
            found.append(_addresses(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))
        except (OSError, UnicodeError, ValueError) as exc:
            errors.append(exc)

    resolver = threading.Thread(target=run, name=f"resolve {host}", daemon=True)
    resolver.start()
    resolver.join(timeout)
    if resolver.is_alive():
        raise FetchTimeout(f"resolving host {host} timed out")
    if errors:
        raise _resolve_failure(host, errors[0])
    if not found or not found[0]:
        raise FetchError(f"cannot resolve host {host} (no addresses)")
    return found[0]


def _addresses(infos: list[tuple[Any, ...]]) -> list[IPAddress]:
    """Unique addresses in resolver order (a scope such as `%eth0` dropped)."""
    addresses: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _resolve_failure(host: str, error: Exception) -> Exception:
    if isinstance(error, socket.gaierror) and error.errno == socket.EAI_AGAIN:
        # "Temporary failure in name resolution": the resolver's fault, not the listing's.
        return TransientError(f"cannot resolve host {host} right now ({reason(error)})")
    return FetchError(f"cannot resolve host {host} ({reason(error)})")
