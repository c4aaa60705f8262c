"""`http(s)` image URLs: connect only to checked addresses, follow redirects by hand re-checking
every hop, and hold the whole fetch to one deadline and one size limit.

We connect to exactly the address the guard checked (so DNS rebinding cannot swap it), while TLS
still verifies the certificate against the URL's hostname. Connections are kept alive for the next
image from the same host and address (`connections`).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from contract.errors import FetchError, TransientError, reason, redacted, shown
from worker.fetch import connections
from worker.fetch.addresses import IPAddress, forget_answer, resolve_checked
from worker.fetch.connections import ConnectionKey
from worker.fetch.deadline import Deadline
from worker.fetch.policy import FetchedImage, FetchPolicy, NotModified, Validators, too_large

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
_DISCONNECTED = "Server disconnected without sending a response"  # httpcore's own words


class _Unreachable(FetchError):
    """Could not connect to one address; the host's other addresses are still worth trying."""


@dataclass(frozen=True)
class _Fetch:
    """One fetch's rules, its deadline, and the validators to send."""

    policy: FetchPolicy
    deadline: Deadline
    validators: Validators | None


def fetch_http_url(
    url: str, policy: FetchPolicy, validators: Validators | None = None
) -> FetchedImage | NotModified:
    """Fetch an `http(s)` image URL under `policy` (`FetchError` or `TransientError` otherwise);
    with `validators` the request is conditional and may answer `NotModified`."""
    fetch = _Fetch(policy, Deadline(policy.timeout), validators)
    return _fetch_http(_parse_http_url(url), fetch)


def _parse_http_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise FetchError(f"invalid URL ({reason(exc)})") from None
    if not parsed.raw_host:
        raise FetchError("URL has no host")
    return parsed.copy_with(fragment=None)


def _fetch_http(url: httpx.URL, fetch: _Fetch) -> FetchedImage | NotModified:
    """Follow redirects by hand, so each hop is resolved and checked before we connect to it."""
    current = url
    for hop in range(fetch.policy.max_redirects + 1):
        try:
            outcome = _fetch_hop(current, fetch)
        except FetchError as exc:
            if hop == 0:
                raise
            raise FetchError(f"redirected to {shown(redacted(str(current)))}: {exc}") from None
        if not isinstance(outcome, httpx.URL):
            return outcome
        current = outcome
    raise FetchError(f"more than {fetch.policy.max_redirects} redirects")


def _fetch_hop(url: httpx.URL, fetch: _Fetch) -> FetchedImage | NotModified | httpx.URL:
    """One request: the image, or the checked URL of the next hop."""
    host = url.raw_host.decode("ascii")
    port = _port(url)
    allowed = fetch.policy.allowed_private_networks
    addresses = resolve_checked(host, port, allowed, fetch.deadline.remaining())
    for address in addresses[:-1]:
        try:
            return _fetch_from(address, url, fetch)
        except _Unreachable:
            continue  # another of the host's checked addresses may answer
    try:
        return _fetch_from(addresses[-1], url, fetch)
    except _Unreachable:
        forget_answer(host, port)  # the next fetch looks the host up again
        raise


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _fetch_from(
    address: IPAddress, url: httpx.URL, fetch: _Fetch
) -> FetchedImage | NotModified | httpx.URL:
    host = url.raw_host.decode("ascii")
    port = _port(url)
    key = ConnectionKey(url.scheme, host, str(address), port)
    with (
        connections.kept_client(key, fetch.deadline) as client,
        _translated_http_errors(host, fetch.deadline),
    ):
        response = _send(client, url.copy_with(host=str(address)), url, fetch)
        try:
            return _handle_response(response, url, fetch)
        finally:
            response.close()


def _send(
    client: connections.KeptClient, target: httpx.URL, url: httpx.URL, fetch: _Fetch
) -> httpx.Response:
    """Send the request, and when it went out on a kept connection that turns out to be dead
    (a server may close an idle connection at any moment, even as the request arrives), once
    more on a new connection before any response: an image GET is safe to repeat, as every
    HTTP client repeats it in this case."""
    request = client.http.build_request(
        "GET", target, headers=_request_headers(url, fetch), extensions=_tls_extensions(url)
    )
    on_kept_connection = client.holds_live_connection()
    try:
        return client.http.send(request, stream=True)
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        if not on_kept_connection:
            raise
    client.renew()
    return client.http.send(request, stream=True)


def _request_headers(url: httpx.URL, fetch: _Fetch) -> dict[str, str]:
    host = url.raw_host.decode("ascii")
    if ":" in host:
        host = f"[{host}]"
    if url.port is not None:
        host = f"{host}:{url.port}"
    headers = {
        "Host": host,  # we connect to the IP, but the server must see the name from the URL
        "User-Agent": fetch.policy.user_agent,
        "Accept": "image/*",
        # Images are compressed already; identity means max_bytes counts what is on the wire.
        "Accept-Encoding": "identity",
    }
    if fetch.validators is not None:
        if fetch.validators.etag:
            headers["If-None-Match"] = fetch.validators.etag
        if fetch.validators.last_modified:
            headers["If-Modified-Since"] = fetch.validators.last_modified
    return headers


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


def _handle_response(
    response: httpx.Response, url: httpx.URL, fetch: _Fetch
) -> FetchedImage | NotModified | httpx.URL:
    status = response.status_code
    host = url.raw_host.decode("ascii")
    if status in _REDIRECT_STATUSES:
        return _redirect_target(response, url)
    if status == 304 and fetch.validators is not None:
        return NotModified(str(url))
    if status in _RETRYABLE_STATUSES:
        raise TransientError(f"HTTP {status} from host {host}")
    if not 200 <= status < 300:
        raise FetchError(f"HTTP {status} from host {host}")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # We asked for identity. Decoding would let a few bytes on the wire become gigabytes
        # in memory before any size check (a "gzip, gzip" bomb); images are compressed anyway.
        raise FetchError(
            f"host {host} sent a compressed response (Content-Encoding: {shown(encoding)}) "
            "although identity was asked for; refused"
        )
    data = _read_body(response, fetch.policy.max_bytes, fetch.deadline)
    return FetchedImage(
        data=data,
        url=str(url),
        content_type=response.headers.get("content-type"),
        validators=Validators(response.headers.get("etag"), response.headers.get("last-modified")),
    )


def _redirect_target(response: httpx.Response, url: httpx.URL) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        raise FetchError(f"HTTP {response.status_code} redirect without a Location header")
    try:
        target = url.join(location)
    except (httpx.InvalidURL, ValueError) as exc:
        raise FetchError(f"redirect to an invalid URL ({reason(exc)})") from None
    if target.scheme not in ("http", "https"):
        raise FetchError(
            f"redirect to {shown(redacted(location))} refused "
            "(only http and https may be redirected to)"
        )
    if url.scheme == "https" and target.scheme == "http":
        raise FetchError(f"redirect from https to plain http ({shown(redacted(location))}) refused")
    if not target.raw_host:
        raise FetchError(f"redirect to {shown(redacted(location))} has no host")
    return target.copy_with(fragment=None)


def _read_body(response: httpx.Response, max_bytes: int, deadline: Deadline) -> bytes:
    """Stream the body, stopping at max_bytes+1 or the deadline, whichever comes first."""
    declared = _content_length(response)
    if declared is not None and declared > max_bytes:
        raise FetchError(f"{too_large(max_bytes)} (Content-Length {declared} bytes)")
    body = bytearray()
    for chunk in response.iter_raw():  # the bytes on the wire: never decompressed by httpx
        body += chunk
        if len(body) > max_bytes:
            raise FetchError(too_large(max_bytes))
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
def _translated_http_errors(host: str, deadline: Deadline) -> Iterator[None]:
    """Turn httpx's exceptions into one-line FetchError/TransientError naming the host."""
    try:
        yield
    except httpx.TimeoutException:
        raise deadline.expired() from None
    except httpx.ConnectError as exc:
        raise _connect_failure(host, exc) from None
    except httpx.RemoteProtocolError as exc:
        if _DISCONNECTED in str(exc):  # closed before answering at all: worth a retry
            raise TransientError(f"connection to host {host} broke ({reason(exc)})") from None
        # Not HTTP, oversized headers, a body shorter than its Content-Length: the host answers
        # like this every time, so the listing fails now instead of burning every attempt.
        raise FetchError(f"host {host} sent a malformed HTTP response ({reason(exc)})") from None
    except httpx.NetworkError as exc:
        # The server accepted us and then broke off: the world's fault, worth a retry.
        raise TransientError(f"connection to host {host} broke ({reason(exc)})") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"request to host {host} failed ({reason(exc)})") from None


def _connect_failure(host: str, exc: httpx.ConnectError) -> FetchError:
    cause = _root_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return FetchError(f"TLS certificate of host {host} rejected ({cause.verify_message})")
    if isinstance(cause, ssl.SSLError):
        return FetchError(f"TLS error with host {host} ({reason(cause)})")
    return _Unreachable(f"cannot connect to host {host} ({reason(cause)})")


def _root_cause(exc: BaseException) -> BaseException:
    """The OSError or SSLError under httpx's and httpcore's wrappers, which say less."""
    for _ in range(10):
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return exc
