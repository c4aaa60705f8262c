"""Fetch one listing image's bytes without letting a listing URL reach our own network.

Image URLs come from sellers, so every fetch is an SSRF risk (OWASP SSRF cheat sheet). We resolve
each host ourselves, refuse any non-public address, then connect to exactly the address we checked
(so DNS rebinding cannot swap it), follow redirects by hand re-checking every hop, and hold the
whole fetch to one deadline and one size limit. `file://` URLs are read only under `file_roots`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from worker.errors import FetchError, TransientError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_BLOCKED_HINT = "(blocked; see LV_ALLOWED_PRIVATE_NETWORKS)"
_MAX_SHOWN_CHARS = 200


@dataclass(frozen=True)
class FetchPolicy:
    """How far one fetch may go.

    max_bytes: largest image accepted, checked against Content-Length and while streaming.
    timeout: seconds for the whole fetch (DNS, connect, every redirect, the body), not per step.
    allowed_private_networks: non-public networks that may still be fetched from (default none).
    file_roots: directories `file://` URLs may be read under; empty refuses every file URL.
    max_redirects: redirects followed before giving up (default 5).
    user_agent: sent with every request (default "listing-vision/0.1").
    """

    max_bytes: int
    timeout: float
    allowed_private_networks: tuple[IPNetwork, ...] = ()
    file_roots: tuple[Path, ...] = ()
    max_redirects: int = 5
    user_agent: str = "listing-vision/0.1"


@dataclass(frozen=True)
class FetchedImage:
    """The raw bytes of one image, the URL they came from after redirects, and its Content-Type."""

    data: bytes
    url: str
    content_type: str | None


class _Unreachable(FetchError):
    """Could not connect to one address; the host's other addresses are still worth trying."""


class _Deadline:
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
        return FetchError(f"timed out after {self.seconds:g}s")


def fetch_image(url: str, policy: FetchPolicy) -> FetchedImage:
    """Fetch one image URL under `policy`; every failure is one line naming the URL."""
    shown = _shown(url)
    try:
        return _fetch(url, policy)
    except FetchError as exc:
        raise FetchError(f"image URL {shown}: {exc}") from None
    except TransientError as exc:
        raise TransientError(f"image URL {shown}: {exc}") from None


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


# --- addresses -------------------------------------------------------------------------------


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
        raise FetchError(f"resolving host {host} timed out")
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
        return TransientError(f"cannot resolve host {host} right now ({_reason(error)})")
    return FetchError(f"cannot resolve host {host} ({_reason(error)})")


# --- http(s) ---------------------------------------------------------------------------------


def _fetch(url: str, policy: FetchPolicy) -> FetchedImage:
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        return _read_file(url, policy)
    if scheme in ("http", "https"):
        return _fetch_http(_parse_http_url(url), policy)
    if not scheme:
        raise FetchError("URL has no scheme (only http, https and file are fetched)")
    raise FetchError(f"unsupported URL scheme {scheme!r} (only http, https and file are fetched)")


def _parse_http_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise FetchError(f"invalid URL ({_reason(exc)})") from None
    if not parsed.raw_host:
        raise FetchError("URL has no host")
    return parsed.copy_with(fragment=None)


def _fetch_http(url: httpx.URL, policy: FetchPolicy) -> FetchedImage:
    """Follow redirects by hand, so each hop is resolved and checked before we connect to it."""
    deadline = _Deadline(policy.timeout)
    tls = _tls_context()
    current = url
    for hop in range(policy.max_redirects + 1):
        try:
            outcome = _fetch_hop(current, policy, deadline, tls)
        except FetchError as exc:
            if hop == 0:
                raise
            raise FetchError(f"redirected to {_shown(str(current))}: {exc}") from None
        if isinstance(outcome, FetchedImage):
            return outcome
        current = outcome
    raise FetchError(f"more than {policy.max_redirects} redirects")


def _fetch_hop(
    url: httpx.URL, policy: FetchPolicy, deadline: _Deadline, tls: ssl.SSLContext
) -> FetchedImage | httpx.URL:
    """One request: the image, or the checked URL of the next hop."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = resolve_checked(host, port, policy.allowed_private_networks, deadline.remaining())
    for address in addresses[:-1]:
        try:
            return _fetch_from(address, url, policy, deadline, tls)
        except _Unreachable:
            continue  # another of the host's checked addresses may answer
    return _fetch_from(addresses[-1], url, policy, deadline, tls)


def _fetch_from(
    address: IPAddress,
    url: httpx.URL,
    policy: FetchPolicy,
    deadline: _Deadline,
    tls: ssl.SSLContext,
) -> FetchedImage | httpx.URL:
    # A client per connection: httpx pools by (scheme, IP, port), and a pooled TLS connection
    # verified for one hostname must never serve a redirect to another name on the same IP.
    host = url.raw_host.decode("ascii")
    with (
        _translated_http_errors(host, deadline),
        httpx.Client(
            verify=tls,
            trust_env=False,  # a proxy from the environment would connect to the name, not the IP
            follow_redirects=False,
            timeout=httpx.Timeout(deadline.remaining()),
        ) as client,
    ):
        request = client.build_request(
            "GET",
            url.copy_with(host=str(address)),
            headers=_request_headers(url, policy),
            extensions=_tls_extensions(url),
        )
        response = client.send(request, stream=True)
        try:
            return _handle_response(response, url, policy, deadline)
        finally:
            response.close()


def _request_headers(url: httpx.URL, policy: FetchPolicy) -> dict[str, str]:
    host = url.raw_host.decode("ascii")
    if ":" in host:
        host = f"[{host}]"
    if url.port is not None:
        host = f"{host}:{url.port}"
    return {
        "Host": host,  # we connect to the IP, but the server must see the name from the URL
        "User-Agent": policy.user_agent,
        "Accept": "image/*",
        # Images are compressed already; identity means max_bytes counts what is on the wire.
        "Accept-Encoding": "identity",
    }


def _tls_extensions(url: httpx.URL) -> dict[str, str]:
    """Make TLS use the URL's hostname although the connection goes to the checked IP.

    httpcore passes `sni_hostname` as `server_hostname` to `SSLContext.wrap_socket`
    (httpcore/_sync/connection.py `_connect`, httpcore/_backends/sync.py `start_tls`). With
    `check_hostname=True` (our default context) Python's ssl uses that one value both for SNI and
    for matching the certificate, so the certificate is verified against the real hostname.
    """
    if url.scheme != "https":
        return {}
    return {"sni_hostname": url.raw_host.decode("ascii")}


def _tls_context() -> ssl.SSLContext:
    """A fresh verifying context per fetch: httpcore mutates it (ALPN) on every connection."""
    return httpx.create_ssl_context(trust_env=False)


def _handle_response(
    response: httpx.Response, url: httpx.URL, policy: FetchPolicy, deadline: _Deadline
) -> FetchedImage | httpx.URL:
    status = response.status_code
    host = url.raw_host.decode("ascii")
    if status in _REDIRECT_STATUSES:
        return _redirect_target(response, url)
    if status in _RETRYABLE_STATUSES:
        raise TransientError(f"HTTP {status} from host {host} (will retry)")
    if not 200 <= status < 300:
        raise FetchError(f"HTTP {status} from host {host}")
    data = _read_body(response, policy.max_bytes, deadline)
    return FetchedImage(data=data, url=str(url), content_type=response.headers.get("content-type"))


def _redirect_target(response: httpx.Response, url: httpx.URL) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        raise FetchError(f"HTTP {response.status_code} redirect without a Location header")
    try:
        target = url.join(location)
    except (httpx.InvalidURL, ValueError) as exc:
        raise FetchError(f"redirect to an invalid URL ({_reason(exc)})") from None
    if target.scheme not in ("http", "https"):
        raise FetchError(
            f"redirect to {_shown(location)} refused (only http and https may be redirected to)"
        )
    if url.scheme == "https" and target.scheme == "http":
        raise FetchError(f"redirect from https to plain http ({_shown(location)}) refused")
    if not target.raw_host:
        raise FetchError(f"redirect to {_shown(location)} has no host")
    return target.copy_with(fragment=None)


def _read_body(response: httpx.Response, max_bytes: int, deadline: _Deadline) -> bytes:
    """Stream the body, stopping at max_bytes+1 or the deadline, whichever comes first."""
    declared = _content_length(response)
    if declared is not None and declared > max_bytes:
        raise FetchError(f"{_too_large(max_bytes)} (Content-Length {declared} bytes)")
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise FetchError(_too_large(max_bytes))
        # Each read may take up to the time left when the request went out; checking here stops
        # a server that drips a byte at a time from stretching the fetch past its deadline.
        deadline.remaining()
    return bytes(body)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


@contextmanager
def _translated_http_errors(host: str, deadline: _Deadline) -> Iterator[None]:
    """Turn httpx's exceptions into one-line FetchError/TransientError naming the host."""
    try:
        yield
    except httpx.TimeoutException:
        raise deadline.expired() from None
    except httpx.ConnectError as exc:
        raise _connect_failure(host, exc) from None
    except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        # The server accepted us and then broke off: the world's fault, worth a retry.
        raise TransientError(f"connection to host {host} broke ({_reason(exc)})") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"request to host {host} failed ({_reason(exc)})") from None


def _connect_failure(host: str, exc: httpx.ConnectError) -> FetchError:
    cause = _root_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return FetchError(f"TLS certificate of host {host} rejected ({cause.verify_message})")
    if isinstance(cause, ssl.SSLError):
        return FetchError(f"TLS error with host {host} ({_reason(cause)})")
    return _Unreachable(f"cannot connect to host {host} ({_reason(cause)})")


def _root_cause(exc: BaseException) -> BaseException:
    """The OSError or SSLError under httpx's and httpcore's wrappers, which say less."""
    for _ in range(10):
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return exc


# --- file:// ---------------------------------------------------------------------------------


def _read_file(url: str, policy: FetchPolicy) -> FetchedImage:
    """Read a file URL, but only a regular file whose real path lies under a file root."""
    real = allowed_file_path(url, policy.file_roots)
    path = _file_url_path(url)
    if not real.exists():
        raise FetchError(f"no such file {path}")
    if not real.is_file():
        raise FetchError(f"{path} is not a regular file")
    try:
        with real.open("rb") as file:
            data = file.read(policy.max_bytes + 1)
    except OSError as exc:
        raise FetchError(f"cannot read {path} ({_reason(exc)})") from None
    if len(data) > policy.max_bytes:
        raise FetchError(_too_large(policy.max_bytes))
    return FetchedImage(data=data, url=url, content_type=None)


def allowed_file_path(url: str, file_roots: tuple[Path, ...]) -> Path:
    """The real path a file URL names, if it lies under a file root; `FetchError` otherwise.

    The producer calls this too, so a file URL is refused at enqueue by the same rules.
    """
    if not file_roots:
        raise FetchError("file URLs are only read under LV_FILE_ROOTS, and none is configured")
    path = _file_url_path(url)
    real = _real_path(path)
    roots = [_real_path(root) for root in file_roots]
    if not any(real.is_relative_to(root) for root in roots):
        raise FetchError(f"file URLs are only read under LV_FILE_ROOTS; {path} is outside them")
    return real


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"file URLs may not name a host ({parts.netloc!r})")
    path = Path(unquote(parts.path))
    if not path.is_absolute():
        raise FetchError("file URLs must hold an absolute path")
    return path


def _real_path(path: Path) -> Path:
    """Resolve symlinks and `..`, so a link inside a root cannot point outside it."""
    try:
        return path.resolve()
    except (OSError, ValueError) as exc:
        raise FetchError(f"invalid file path {path} ({_reason(exc)})") from None


# --- messages --------------------------------------------------------------------------------


def _too_large(max_bytes: int) -> str:
    return f"image is larger than the {_size(max_bytes)} limit"


def _size(n: int) -> str:
    """Decimal units, as LV_MAX_IMAGE_BYTES is documented (20000000 is "20 MB")."""
    if n >= 1_000_000:
        return f"{round(n / 1_000_000, 1):g} MB"
    if n >= 1_000:
        return f"{round(n / 1_000, 1):g} KB"
    return f"{n} bytes"


def _reason(exc: BaseException) -> str:
    """A short one-line reason: strerror for OS errors, else the message, never a traceback."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return _shown(str(text))


def _shown(text: str) -> str:
    """Text safe for a one-line message: control characters replaced, long values cut."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()
    if len(text) > _MAX_SHOWN_CHARS:
        return text[: _MAX_SHOWN_CHARS - 1] + "…"
    return text
