"""worker.fetch: the SSRF guard, redirects, limits and error wording, against loopback servers only.

Every TCP connection the code under test opens goes through `socket.create_connection`; the
autouse `connections` fixture records each one and fails the test on any non-loopback address,
so a guard that let a request through would fail loudly instead of reaching the network.
"""

from __future__ import annotations

import gc
import io
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from contract.errors import FetchError, TransientError, redacted
from contract.urls import url_problem
from tests.unit.fetch_servers import (
    IMAGE_BYTES,
    OVERSIZE,
    Running,
    make_certificate,
    serve,
)
from worker.fetch import (
    FetchedImage,
    FetchPolicy,
    NotModified,
    Validators,
    addresses,
    fetch_image,
    http,
)
from worker.fetch import connections as kept
from worker.fetch.addresses import check_address, resolve_checked

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
METADATA_URL = "http://169.254.169.254/latest/meta-data"
REPO_ROOT = Path(__file__).resolve().parents[2]


def policy(**overrides: Any) -> FetchPolicy:
    """A loopback-allowing policy with a 1000-byte limit, so oversize bodies are cheap."""
    settings: dict[str, Any] = {
        "max_bytes": 1000,
        "timeout": 5.0,
        "allowed_private_networks": LOOPBACK,
    }
    return FetchPolicy(**(settings | overrides))


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every outgoing connection attempt; anything but loopback fails the test on the spot."""
    attempts: list[tuple[str, int]] = []
    real = socket.create_connection

    def guarded(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        attempts.append((address[0], address[1]))
        if not ipaddress.ip_address(address[0]).is_loopback:
            pytest.fail(f"fetch tried to connect to {address[0]}:{address[1]}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return attempts


@dataclass
class FakeDNS:
    """Answers for `.test` names: addresses, or a function of the lookup's number (1, 2, ...)."""

    answers: dict[str, list[str] | Callable[[int], list[str]]] = field(default_factory=dict)
    lookups: dict[str, int] = field(default_factory=dict)

    def __setitem__(self, host: str, answer: list[str] | Callable[[int], list[str]]) -> None:
        self.answers[host] = answer

    def answer(self, host: str) -> list[str]:
        self.lookups[host] = self.lookups.get(host, 0) + 1
        answer = self.answers[host]
        return answer(self.lookups[host]) if callable(answer) else answer


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    """Route getaddrinfo for the names a test sets through a FakeDNS; others resolve for real."""
    fake = FakeDNS()
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if host not in fake.answers:
            return real(host, port, *args, **kwargs)
        return [_addrinfo(address, port) for address in fake.answer(host)]

    monkeypatch.setattr(addresses.socket, "getaddrinfo", getaddrinfo)
    return fake


def _addrinfo(address: str, port: int) -> tuple[Any, ...]:
    if ":" in address:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))


@pytest.fixture
def server() -> Iterator[Running]:
    with serve() as running:
        yield running


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    made = make_certificate(tmp_path_factory.mktemp("tls"), "images.test")
    if made is None:
        pytest.skip("openssl is needed to make a test certificate")
    return made


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[Running]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    with serve(tls=context) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_connections() -> Iterator[None]:
    """No test reuses a connection, a TLS context or a name's addresses another test left."""
    kept.forget_connections()
    addresses.forget_answers()
    yield
    kept.forget_connections()
    addresses.forget_answers()


@pytest.fixture
def trust_test_certificate(monkeypatch: pytest.MonkeyPatch, certificate: tuple[Path, Path]) -> None:
    cert = str(certificate[0])
    monkeypatch.setattr(kept, "_new_tls_context", lambda: ssl.create_default_context(cafile=cert))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def refusal(url: str, fetch_policy: FetchPolicy) -> str:
    """Fetch a URL that must fail, and return its one-line message."""
    with pytest.raises(FetchError) as caught:
        fetch_image(url, fetch_policy)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- the address guard -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("2002:a9fe:a9fe::1", "embedding 169.254.169.254"),  # 6to4
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
    ],
)
def test_non_public_addresses_are_refused_with_their_kind(address: str, kind: str) -> None:
    with pytest.raises(FetchError, match=kind) as caught:
        check_address(ipaddress.ip_address(address), ())
    assert "LV_ALLOWED_PRIVATE_NETWORKS" in str(caught.value)


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946", "64:ff9b::5db8:d822"],
)
def test_global_addresses_pass_the_guard(address: str) -> None:
    check_address(ipaddress.ip_address(address), ())  # raises if refused
    assert resolve_checked(address, 443, ()) == [ipaddress.ip_address(address)]


def test_allowed_private_network_lets_its_addresses_through() -> None:
    allowed = (ipaddress.ip_network("10.0.0.0/8"),)
    check_address(ipaddress.ip_address("10.0.0.5"), allowed)
    check_address(ipaddress.ip_address("::ffff:10.0.0.5"), allowed)
    with pytest.raises(FetchError, match="private"):
        check_address(ipaddress.ip_address("192.168.0.5"), allowed)


def test_resolve_checked_refuses_localhost_unless_loopback_is_allowed() -> None:
    with pytest.raises(FetchError, match=r"localhost resolves to .*loopback"):
        resolve_checked("localhost", 80, ())
    addresses = resolve_checked("localhost", 80, LOOPBACK)
    assert addresses
    assert all(address.is_loopback for address in addresses)


def test_resolve_checked_refuses_a_host_when_any_address_is_private(dns: FakeDNS) -> None:
    dns["mixed.test"] = ["93.184.216.34", "10.0.0.5"]
    with pytest.raises(FetchError, match=r"mixed\.test resolves to 10\.0\.0\.5, a private address"):
        resolve_checked("mixed.test", 443, ())


def test_resolve_checked_checks_literal_ips_without_dns(dns: FakeDNS) -> None:
    with pytest.raises(FetchError, match=r"169\.254\.169\.254 is a link-local address"):
        resolve_checked("169.254.169.254", 80, ())
    assert dns.lookups == {}


def test_hostname_resolving_to_metadata_address_is_refused_before_connecting(
    dns: FakeDNS, connections: list[tuple[str, int]]
) -> None:
    dns["metadata.test"] = ["169.254.169.254"]
    message = refusal("http://metadata.test/latest/meta-data", policy())
    assert message == (
        "image URL http://metadata.test/latest/meta-data: metadata.test resolves to "
        "169.254.169.254, a link-local address (blocked; see LV_ALLOWED_PRIVATE_NETWORKS)"
    )
    assert connections == []


def test_hostname_with_one_private_address_among_public_ones_is_refused(
    dns: FakeDNS, connections: list[tuple[str, int]]
) -> None:
    dns["mixed.test"] = ["127.0.0.1", "10.0.0.5"]
    assert "10.0.0.5, a private address" in refusal("http://mixed.test/a.jpg", policy())
    assert connections == []


def test_loopback_url_is_refused_before_connecting_when_not_allowed(
    server: Running, connections: list[tuple[str, int]]
) -> None:
    message = refusal(f"{server.base_url}/image.jpg", policy(allowed_private_networks=()))
    assert "127.0.0.1 is a loopback address" in message
    assert connections == []
    assert server.requests == []


# --- connecting to the checked address -------------------------------------------------------


def test_fetches_an_image_with_its_content_type(server: Running) -> None:
    image = fetch_image(f"{server.base_url}/image.jpg", policy())
    assert image.data == IMAGE_BYTES
    assert image.content_type == "image/png"
    assert image.url == f"{server.base_url}/image.jpg"


def test_connects_to_the_checked_address_and_sends_the_original_host_header(
    server: Running, dns: FakeDNS, connections: list[tuple[str, int]]
) -> None:
    # A rebinding resolver: the first answer passes the guard, any later one is the metadata IP.
    dns["images.test"] = lambda nth: ["127.0.0.1"] if nth == 1 else ["169.254.169.254"]
    image = fetch_image(f"http://images.test:{server.port}/image.jpg", policy())
    assert image.data == IMAGE_BYTES
    assert image.url == f"http://images.test:{server.port}/image.jpg"
    assert dns.lookups == {"images.test": 1}
    assert connections == [("127.0.0.1", server.port)]
    assert server.requests[0].host == f"images.test:{server.port}"
    assert server.requests[0].user_agent == "listing-vision/0.1"


def test_falls_back_to_the_hosts_next_checked_address_when_one_refuses(
    server: Running, dns: FakeDNS, connections: list[tuple[str, int]]
) -> None:
    dns["images.test"] = ["127.0.0.2", "127.0.0.1"]  # nothing listens on 127.0.0.2
    assert fetch_image(f"http://images.test:{server.port}/image.jpg", policy()).data == IMAGE_BYTES
    assert connections == [("127.0.0.2", server.port), ("127.0.0.1", server.port)]


def test_ipv6_literal_url_is_fetched_with_a_bracketed_host() -> None:
    try:
        context = serve("::1")
        running = context.__enter__()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        image = fetch_image(f"{running.base_url}/image.jpg", policy())
        assert image.data == IMAGE_BYTES
        assert running.requests[0].host == f"[::1]:{running.port}"
    finally:
        context.__exit__(None, None, None)


def test_https_connects_to_the_ip_but_verifies_the_certificate_for_the_hostname(
    tls_server: Running,
    dns: FakeDNS,
    trust_test_certificate: None,
    connections: list[tuple[str, int]],
) -> None:
    dns["images.test"] = ["127.0.0.1"]
    image = fetch_image(f"https://images.test:{tls_server.port}/image.jpg", policy())
    assert image.data == IMAGE_BYTES
    assert connections == [("127.0.0.1", tls_server.port)]
    assert tls_server.tls_server_names == ["images.test"]
    assert tls_server.requests[0].host == f"images.test:{tls_server.port}"


def test_https_certificate_for_another_hostname_is_rejected(
    tls_server: Running, dns: FakeDNS, trust_test_certificate: None
) -> None:
    dns["other.test"] = ["127.0.0.1"]
    message = refusal(f"https://other.test:{tls_server.port}/image.jpg", policy())
    assert "TLS certificate of host other.test rejected" in message
    assert "mismatch" in message
    assert tls_server.requests == []


def test_https_self_signed_certificate_is_rejected_by_default(
    tls_server: Running, dns: FakeDNS
) -> None:
    dns["images.test"] = ["127.0.0.1"]
    message = refusal(f"https://images.test:{tls_server.port}/image.jpg", policy())
    assert "TLS certificate of host images.test rejected" in message
    assert tls_server.requests == []


# --- kept connections and answers -----------------------------------------------------------


def test_images_from_one_host_share_one_kept_connection(
    server: Running, dns: FakeDNS, connections: list[tuple[str, int]]
) -> None:
    dns["images.test"] = ["127.0.0.1"]
    for _ in range(3):
        assert fetch_image(f"http://images.test:{server.port}/image.jpg", policy()).data
    assert connections == [("127.0.0.1", server.port)]
    assert dns.lookups == {"images.test": 1}  # the answer is kept too
    assert [seen.host for seen in server.requests] == [f"images.test:{server.port}"] * 3


def test_another_hostname_on_the_same_address_gets_its_own_connection(
    server: Running, dns: FakeDNS, connections: list[tuple[str, int]]
) -> None:
    dns["images.test"] = ["127.0.0.1"]
    dns["other.test"] = ["127.0.0.1"]
    for host in ("images.test", "other.test", "images.test", "other.test"):
        fetch_image(f"http://{host}:{server.port}/image.jpg", policy())
    assert connections == [("127.0.0.1", server.port)] * 2
    assert [seen.host for seen in server.requests] == [
        f"{host}:{server.port}" for host in ("images.test", "other.test") * 2
    ]


def test_a_kept_tls_connection_never_serves_another_hostname(
    tls_server: Running, dns: FakeDNS, trust_test_certificate: None
) -> None:
    """The certificate names images.test only: were other.test's request sent on the kept
    connection verified for images.test, it would succeed."""
    dns["images.test"] = ["127.0.0.1"]
    dns["other.test"] = ["127.0.0.1"]
    for _ in range(2):
        fetch_image(f"https://images.test:{tls_server.port}/image.jpg", policy())
    assert tls_server.tls_server_names == ["images.test"]  # one handshake for both
    message = refusal(f"https://other.test:{tls_server.port}/image.jpg", policy())
    assert "TLS certificate of host other.test rejected" in message
    assert [seen.host for seen in tls_server.requests] == [f"images.test:{tls_server.port}"] * 2


def test_a_kept_connection_the_server_closed_is_replaced_without_failing_the_fetch(
    server: Running, connections: list[tuple[str, int]]
) -> None:
    fetch_image(f"{server.base_url}/image.jpg", policy())
    image = fetch_image(f"{server.base_url}/hang-up-if-reused", policy())
    assert image.data == IMAGE_BYTES
    assert connections == [("127.0.0.1", server.port)] * 2
    assert [seen.path for seen in server.requests] == [
        "/image.jpg",
        "/hang-up-if-reused",  # on the kept connection: no answer
        "/hang-up-if-reused",  # once more, on a new one
    ]


def test_a_kept_connection_still_obeys_each_fetchs_deadline(server: Running) -> None:
    fetch_image(f"{server.base_url}/image.jpg", policy(timeout=30.0))
    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out after 1s"):
        fetch_image(f"{server.base_url}/drip", policy(timeout=1.0, max_bytes=10_000))
    assert time.monotonic() - started < 2.5


def test_a_failed_fetch_does_not_leave_its_connection_for_the_next(
    server: Running, connections: list[tuple[str, int]]
) -> None:
    assert "larger than" in refusal(f"{server.base_url}/big", policy())  # body left unread
    assert fetch_image(f"{server.base_url}/image.jpg", policy()).data == IMAGE_BYTES
    assert connections == [("127.0.0.1", server.port)] * 2


def test_a_kept_answer_is_checked_again_under_each_fetchs_policy(
    server: Running, dns: FakeDNS
) -> None:
    dns["images.test"] = ["127.0.0.1"]
    fetch_image(f"http://images.test:{server.port}/image.jpg", policy())
    message = refusal(
        f"http://images.test:{server.port}/image.jpg", policy(allowed_private_networks=())
    )
    assert "images.test resolves to 127.0.0.1, a loopback address" in message
    assert dns.lookups == {"images.test": 1}


def test_an_answer_is_looked_up_again_once_it_is_older_than_its_lifetime(
    server: Running, dns: FakeDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    dns["images.test"] = ["127.0.0.1"]
    monkeypatch.setattr(addresses, "ANSWER_SECONDS", 0.0)
    for _ in range(2):
        fetch_image(f"http://images.test:{server.port}/image.jpg", policy())
    assert dns.lookups == {"images.test": 2}


def test_each_fetch_thread_keeps_at_most_a_few_connections(
    server: Running, dns: FakeDNS, connections: list[tuple[str, int]]
) -> None:
    hosts = [f"host{i}.test" for i in range(kept.KEPT_PER_THREAD + 1)]
    for host in hosts:
        dns[host] = ["127.0.0.1"]
        fetch_image(f"http://{host}:{server.port}/image.jpg", policy())
    assert kept.kept_count() == kept.KEPT_PER_THREAD
    fetch_image(f"http://{hosts[-1]}:{server.port}/image.jpg", policy())  # kept
    fetch_image(f"http://{hosts[0]}:{server.port}/image.jpg", policy())  # closed: the oldest
    assert len(connections) == kept.KEPT_PER_THREAD + 2


def test_bytes_beyond_a_response_never_answer_the_next_fetch(
    server: Running, connections: list[tuple[str, int]]
) -> None:
    """A server that sends more than its Content-Length: on a kept connection, the extra bytes
    (here a whole response saying EVIL) would be read as the next request's answer."""
    assert fetch_image(f"{server.base_url}/image-and-more", policy()).data == IMAGE_BYTES
    for _ in range(2):
        assert fetch_image(f"{server.base_url}/image.jpg", policy()).data == IMAGE_BYTES
    assert connections == [("127.0.0.1", server.port)] * 3  # the host's are no longer kept


def test_bytes_sent_unasked_on_an_idle_connection_are_never_an_answer(
    server: Running, connections: list[tuple[str, int]], caplog: pytest.LogCaptureFixture
) -> None:
    """Stray bytes that arrive while the connection idles are found before it is reused: the
    next fetch gets a new connection, and the host's connections are no longer kept."""
    assert fetch_image(f"{server.base_url}/image-then-stray", policy()).data == IMAGE_BYTES
    time.sleep(0.3)  # the stray response arrives while the connection idles
    for _ in range(2):
        assert fetch_image(f"{server.base_url}/image.jpg", policy()).data == IMAGE_BYTES
    assert connections == [("127.0.0.1", server.port)] * 3  # none kept after the stray
    assert kept.kept_count() == 0
    assert "sent bytes nobody asked for" in caplog.text


def test_a_request_on_a_new_connection_is_sent_once_even_when_the_server_hangs_up(
    server: Running,
) -> None:
    """Only a kept connection is tried twice: a server that breaks off on a new one is not
    sent the request again (the job's own retry decides). A redirect whose body is left unread
    ends its connection, so the next hop's is new too."""
    for url in ("/hang-up", "/redirect-with-body?to=/hang-up"):
        with pytest.raises(TransientError, match="broke"):
            fetch_image(f"{server.base_url}{url}", policy())
    seen = [seen.path for seen in server.requests]
    assert seen == ["/hang-up", "/redirect-with-body", "/hang-up"]


def test_connections_idle_too_long_are_closed_at_the_threads_next_fetch(
    server: Running, dns: FakeDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    dns["images.test"] = ["127.0.0.1"]
    dns["other.test"] = ["127.0.0.1"]
    fetch_image(f"http://images.test:{server.port}/image.jpg", policy())
    assert kept.kept_count() == 1
    monkeypatch.setattr(kept, "IDLE_SECONDS", 0.0)
    fetch_image(f"http://other.test:{server.port}/image.jpg", policy())
    assert kept.kept_count() == 1  # images.test's closed, other.test's kept


def test_the_sweeper_closes_idle_connections_of_a_thread_that_stopped_fetching(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched, release = threading.Event(), threading.Event()

    def fetch_then_idle() -> None:
        fetch_image(f"{server.base_url}/image.jpg", policy())
        fetched.set()
        release.wait(10)  # alive, and fetching nothing more

    idler = threading.Thread(target=fetch_then_idle)
    idler.start()
    try:
        assert fetched.wait(10)
        kept.sweep_idle()
        assert kept.kept_count() == 1  # not idle long enough yet
        monkeypatch.setattr(kept, "IDLE_SECONDS", 0.0)
        kept.sweep_idle()
        assert kept.kept_count() == 0
    finally:
        release.set()
        idler.join(10)


def test_past_the_process_limit_a_fetchs_connection_is_closed_when_it_ends(
    server: Running, connections: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kept, "KEPT_PER_PROCESS", 0)
    for _ in range(2):
        fetch_image(f"{server.base_url}/image.jpg", policy())
    assert kept.kept_count() == 0
    assert connections == [("127.0.0.1", server.port)] * 2


def test_a_finished_threads_connections_are_closed(server: Running) -> None:
    worker = threading.Thread(target=fetch_image, args=(f"{server.base_url}/image.jpg", policy()))
    worker.start()
    worker.join()
    gc.collect()
    assert kept.kept_count() == 0


def test_a_host_none_of_whose_addresses_answers_is_looked_up_again(
    server: Running, dns: FakeDNS
) -> None:
    dns["moved.test"] = lambda nth: ["127.0.0.2"] if nth == 1 else ["127.0.0.1"]  # 2: nothing
    assert "cannot connect" in refusal(f"http://moved.test:{server.port}/image.jpg", policy())
    assert fetch_image(f"http://moved.test:{server.port}/image.jpg", policy()).data
    assert dns.lookups == {"moved.test": 2}


# --- redirects -------------------------------------------------------------------------------


def test_redirect_chain_within_the_limit_reaches_the_image(server: Running) -> None:
    image = fetch_image(f"{server.base_url}/redirect/4", policy(max_redirects=5))
    assert image.data == IMAGE_BYTES
    assert image.url == f"{server.base_url}/image.jpg"
    assert len(server.requests) == 6


def test_redirect_chain_over_the_limit_is_refused(server: Running) -> None:
    message = refusal(f"{server.base_url}/redirect/5", policy(max_redirects=5))
    assert "more than 5 redirects" in message
    assert len(server.requests) == 6


def test_redirect_loop_is_refused(server: Running) -> None:
    assert "more than 3 redirects" in refusal(f"{server.base_url}/loop", policy(max_redirects=3))


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_every_redirect_status_is_followed(server: Running, status: int) -> None:
    image = fetch_image(f"{server.base_url}/redirect-code/{status}", policy())
    assert image.url == f"{server.base_url}/image.jpg"


def test_redirect_to_link_local_is_refused_before_connecting(
    server: Running, connections: list[tuple[str, int]]
) -> None:
    message = refusal(f"{server.base_url}/redirect-to?to={METADATA_URL}", policy())
    assert f"redirected to {METADATA_URL}: 169.254.169.254 is a link-local address" in message
    assert connections == [("127.0.0.1", server.port)]


def test_redirect_to_file_url_is_refused(server: Running) -> None:
    fetch_policy = policy(file_roots=(Path("/"),))  # even where file URLs are allowed
    message = refusal(f"{server.base_url}/redirect-to?to=file:///etc/passwd", fetch_policy)
    assert "redirect to file:///etc/passwd refused" in message


def test_redirect_without_location_is_refused(server: Running) -> None:
    assert "without a Location" in refusal(f"{server.base_url}/no-location", policy())


# --- status codes and failures ---------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410])
def test_client_error_statuses_fail_the_listing(server: Running, status: int) -> None:
    message = refusal(f"{server.base_url}/status/{status}", policy())
    assert f"HTTP {status} from host 127.0.0.1" in message


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_overload_and_server_error_statuses_are_transient(server: Running, status: int) -> None:
    with pytest.raises(TransientError, match=f"HTTP {status} from host 127.0.0.1"):
        fetch_image(f"{server.base_url}/status/{status}", policy())


def test_connection_refused_is_a_short_fetch_error() -> None:
    port = closed_port()
    message = refusal(f"http://127.0.0.1:{port}/a.jpg", policy())
    assert message == (
        f"image URL http://127.0.0.1:{port}/a.jpg: "
        "cannot connect to host 127.0.0.1 (Connection refused)"
    )


def test_unknown_host_is_a_fetch_error(dns: FakeDNS) -> None:
    def not_found(nth: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    dns["gone.test"] = not_found
    message = refusal("http://gone.test/a.jpg", policy())
    assert "cannot resolve host gone.test (Name or service not known)" in message


def test_temporary_dns_failure_is_transient(dns: FakeDNS) -> None:
    def try_again(nth: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    dns["flaky.test"] = try_again
    with pytest.raises(TransientError, match=r"cannot resolve host flaky\.test right now"):
        fetch_image("http://flaky.test/a.jpg", policy())


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("ftp://example.com/a.jpg", "'ftp'"),
        ("gopher://example.com/", "'gopher'"),
        ("data:image/png;base64,AAAA", "'data'"),
        ("javascript:alert(1)", "'javascript'"),
    ],
)
def test_unsupported_schemes_are_refused(url: str, scheme: str) -> None:
    assert f"unsupported URL scheme {scheme}" in refusal(url, policy())


def test_url_without_scheme_is_refused() -> None:
    assert "no scheme" in refusal("//example.com/a.jpg", policy())


def test_long_urls_are_cut_in_messages() -> None:
    message = refusal("ftp://example.com/" + "a" * 5000, policy())
    assert len(message) < 400
    assert message.endswith("(only http, https and file are fetched)")


# --- size and time limits --------------------------------------------------------------------


def test_oversize_body_with_honest_content_length_is_refused(server: Running) -> None:
    message = refusal(f"{server.base_url}/big", policy())
    assert f"image is larger than the 1 KB limit (Content-Length {OVERSIZE} bytes)" in message


@pytest.mark.parametrize("route", ["big-chunked", "big-close-delimited"])
def test_oversize_body_without_content_length_stops_at_the_limit(
    server: Running, route: str
) -> None:
    started = time.monotonic()
    message = refusal(f"{server.base_url}/{route}", policy())
    assert message.endswith("image is larger than the 1 KB limit")
    # Stopped at the size limit, not at the 5 s deadline (generous: a loaded machine is slow).
    assert time.monotonic() - started < 4.5


def test_slow_drip_body_fails_at_the_deadline(server: Running) -> None:
    started = time.monotonic()
    message = refusal(f"{server.base_url}/drip", policy(timeout=1.0))
    elapsed = time.monotonic() - started
    assert message.endswith("timed out after 1s")
    assert 0.9 < elapsed < 4.5  # the deadline's doing, not the server's giving up after 5 s


def test_headers_dripped_a_byte_at_a_time_fail_at_the_deadline(server: Running) -> None:
    """Issue 14 #2: the deadline was checked only while reading the body."""
    started = time.monotonic()
    message = refusal(f"{server.base_url}/drip-headers", policy(timeout=1.0))
    assert message.endswith("timed out after 1s")
    assert time.monotonic() - started < 5.5  # the server would drip for 6 s


def test_server_that_never_answers_fails_at_the_deadline(server: Running) -> None:
    started = time.monotonic()
    assert refusal(f"{server.base_url}/stall", policy(timeout=1.0)).endswith("timed out after 1s")
    assert time.monotonic() - started < 4.5  # the server stalls for 5 s


def test_deadline_covers_a_hanging_dns_lookup(dns: FakeDNS) -> None:
    release = threading.Event()

    def hang(nth: int) -> list[str]:
        release.wait(10)
        return []

    dns["slow.test"] = hang
    started = time.monotonic()
    try:
        message = refusal("http://slow.test/a.jpg", policy(timeout=0.5))
    finally:
        release.set()
    assert "resolving host slow.test timed out" in message
    assert time.monotonic() - started < 8  # the lookup hangs for 10 s


# --- file:// ---------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "photo.jpg").write_bytes(IMAGE_BYTES)
    (root / "huge.jpg").write_bytes(b"x" * OVERSIZE)
    (outside / "secret.jpg").write_bytes(b"secret")
    (root / "link.jpg").symlink_to(outside / "secret.jpg")
    return {"root": root, "outside": outside}


def file_policy(*roots: Path) -> FetchPolicy:
    return policy(file_roots=roots)


def test_file_inside_a_root_is_read(files: dict[str, Path]) -> None:
    url = f"file://{files['root']}/photo.jpg"
    image = fetch_image(url, file_policy(files["root"]))
    assert isinstance(image, FetchedImage)
    assert (image.data, image.url, image.content_type) == (IMAGE_BYTES, url, None)


def test_an_unchanged_file_answers_a_conditional_read_as_not_modified(
    files: dict[str, Path],
) -> None:
    url = f"file://{files['root']}/photo.jpg"
    first = fetch_image(url, file_policy(files["root"]))
    assert isinstance(first, FetchedImage) and first.validators.etag

    again = fetch_image(url, file_policy(files["root"]), first.validators)
    (files["root"] / "photo.jpg").write_bytes(IMAGE_BYTES + b"changed")
    changed = fetch_image(url, file_policy(files["root"]), first.validators)

    assert again == NotModified(url)
    assert isinstance(changed, FetchedImage) and changed.data.endswith(b"changed")


def test_a_conditional_http_request_sends_the_validators_and_takes_a_304(
    server: Running,
) -> None:
    url = f"{server.base_url}/versioned.jpg"
    first = fetch_image(url, policy())
    assert isinstance(first, FetchedImage)
    assert first.validators == Validators('"v1"', "Mon, 23 Nov 2026 10:00:00 GMT")

    again = fetch_image(url, policy(), first.validators)
    stale = fetch_image(url, policy(), Validators('"v0"'))

    assert again == NotModified(url)
    assert isinstance(stale, FetchedImage) and stale.data == IMAGE_BYTES


def test_a_304_to_an_unconditional_request_is_an_error(server: Running) -> None:
    with pytest.raises(FetchError, match="HTTP 304"):
        fetch_image(f"{server.base_url}/status/304", policy())


def test_file_roots_are_resolved_too(files: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "root-link").symlink_to(files["root"])
    image = fetch_image(f"file://{files['root']}/photo.jpg", file_policy(tmp_path / "root-link"))
    assert image.data == IMAGE_BYTES


def test_file_outside_the_roots_is_refused(files: dict[str, Path]) -> None:
    message = refusal(f"file://{files['outside']}/secret.jpg", file_policy(files["root"]))
    assert "file URLs are only read under LV_FILE_ROOTS" in message


def test_symlink_from_a_root_to_outside_is_refused(files: dict[str, Path]) -> None:
    message = refusal(f"file://{files['root']}/link.jpg", file_policy(files["root"]))
    assert "only read under LV_FILE_ROOTS" in message


@pytest.mark.parametrize("dots", ["..", "%2e%2e"])
def test_dot_dot_traversal_out_of_a_root_is_refused(files: dict[str, Path], dots: str) -> None:
    url = f"file://{files['root']}/{dots}/outside/secret.jpg"
    assert "only read under LV_FILE_ROOTS" in refusal(url, file_policy(files["root"]))


def test_a_symlink_loop_under_a_root_is_a_clear_error_not_a_crash(files: dict[str, Path]) -> None:
    """Python 3.11's resolve() raises RuntimeError for a loop: it escaped both the worker's
    fetch and the producer's check of event URLs (found 2026-12-01)."""
    (files["root"] / "a.jpg").symlink_to(files["root"] / "b.jpg")
    (files["root"] / "b.jpg").symlink_to(files["root"] / "a.jpg")
    url = f"file://{files['root']}/a.jpg"
    assert "a symlink loop" in refusal(url, file_policy(files["root"]))
    assert "a symlink loop" in (url_problem(url, (files["root"],)) or "")


def test_file_urls_are_refused_without_roots(files: dict[str, Path]) -> None:
    message = refusal(f"file://{files['root']}/photo.jpg", policy())
    assert "only read under LV_FILE_ROOTS, and none is configured" in message


def test_oversize_file_is_refused(files: dict[str, Path]) -> None:
    message = refusal(f"file://{files['root']}/huge.jpg", file_policy(files["root"]))
    assert message.endswith("image is larger than the 1 KB limit")


@pytest.mark.parametrize(
    ("name", "expected"), [("missing.jpg", "no such file"), ("", "not a regular file")]
)
def test_missing_file_or_directory_is_refused(
    files: dict[str, Path], name: str, expected: str
) -> None:
    assert expected in refusal(f"file://{files['root']}/{name}", file_policy(files["root"]))


def test_file_url_naming_a_host_is_refused(files: dict[str, Path]) -> None:
    url = f"file://fileserver{files['root']}/photo.jpg"
    assert "may not name a host" in refusal(url, file_policy(files["root"]))


# --- end to end in a private network namespace -----------------------------------------------

NAMESPACE_SCRIPT = """
    import ipaddress, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from contract.errors import FetchError
    from worker.fetch import FetchPolicy, fetch_image

    seen = []

    class Metadata(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "6")
            self.end_headers()
            self.wfile.write(b"secret")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("169.254.169.254", 80), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = "http://169.254.169.254/latest/meta-data"
    try:
        fetch_image(url, FetchPolicy(max_bytes=1000, timeout=2))
        sys.exit("FETCHED the metadata address")
    except FetchError as exc:
        print("refused:", exc)
    assert seen == [], seen
    # Control: the same fetch, explicitly allowed, does reach the listener.
    allowed = (ipaddress.ip_network("169.254.0.0/16"),)
    got = fetch_image(url, FetchPolicy(max_bytes=1000, timeout=2, allowed_private_networks=allowed))
    assert got.data == b"secret" and seen == ["/latest/meta-data"], seen
    print("ok")
"""


def namespace_runner() -> Callable[[Path], subprocess.CompletedProcess[str]] | None:
    """Run a script in a fresh network namespace with 169.254.169.254 on its own loopback."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return None
    setup = 'ip link set lo up && ip addr add 169.254.169.254/32 dev lo || exit 77; exec "$0" "$1"'

    def run(script: Path) -> subprocess.CompletedProcess[str]:
        command = ["unshare", "--net", "sh", "-c", setup, sys.executable, str(script)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        return subprocess.run(
            command, capture_output=True, text=True, timeout=30, env=env, check=False
        )

    return run


def test_metadata_address_is_refused_end_to_end_in_a_network_namespace(tmp_path: Path) -> None:
    run = namespace_runner()
    if run is None:
        pytest.skip("unshare --net is not available or not permitted here")
    script = tmp_path / "metadata.py"
    script.write_text(textwrap.dedent(NAMESPACE_SCRIPT))
    done = run(script)
    if done.returncode == 77:
        pytest.skip(f"cannot configure the namespace's loopback: {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "refused: image URL http://169.254.169.254/latest/meta-data" in done.stdout
    assert "link-local address" in done.stdout
    assert done.stdout.rstrip().endswith("ok")


def test_redirect_from_https_to_plain_http_is_refused() -> None:
    request = httpx.Request("GET", "https://images.example.com/a.jpg")
    response = httpx.Response(
        302, headers={"location": "http://images.example.com/a.jpg"}, request=request
    )
    with pytest.raises(FetchError, match="https to plain http"):
        http._redirect_target(response, request.url)


def test_redirect_from_http_to_https_is_followed() -> None:
    request = httpx.Request("GET", "http://images.example.com/a.jpg")
    response = httpx.Response(
        301, headers={"location": "https://images.example.com/a.jpg"}, request=request
    )
    assert str(http._redirect_target(response, request.url)) == "https://images.example.com/a.jpg"


# --- hostile responses (issue 14) ------------------------------------------------------------


def test_a_compressed_response_is_refused_without_being_decompressed(server: Running) -> None:
    before = psutil.Process().memory_info().rss
    message = refusal(f"{server.base_url}/gzip-bomb", policy(max_bytes=10_000_000))
    assert "compressed response (Content-Encoding: gzip, gzip)" in message
    assert "refused" in message
    # Decoded, the body would be 50 MB in one chunk; nothing near that was allocated.
    assert psutil.Process().memory_info().rss - before < 30_000_000


@pytest.mark.parametrize(
    ("route", "says"),
    [
        ("short-body", "malformed HTTP response"),
        ("not-http", "malformed HTTP response"),
        ("huge-headers", "malformed HTTP response"),
    ],
)
def test_malformed_http_fails_the_image_for_good_not_as_a_retry(
    server: Running, route: str, says: str
) -> None:
    with pytest.raises(FetchError) as raised:
        fetch_image(f"{server.base_url}/{route}", policy(max_bytes=10_000_000))
    assert not isinstance(raised.value, TransientError)
    assert says in str(raised.value)


# --- secrets in URLs (issue 15) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown_as"),
    [
        (
            "https://cdn.test/a.jpg?X-Amz-Signature=abc123&X-Amz-Expires=60",
            "https://cdn.test/a.jpg?X-Amz-Signature=…&X-Amz-Expires=…",
        ),
        ("https://user:hunter2@cdn.test/a.jpg", "https://***@cdn.test/a.jpg"),
        ("https://cdn.test/a.jpg#token=zzz", "https://cdn.test/a.jpg#…"),
        ("https://cdn.test/a.jpg", "https://cdn.test/a.jpg"),
    ],
)
def test_urls_are_redacted_before_they_are_shown(url: str, shown_as: str) -> None:
    assert redacted(url) == shown_as


def test_a_failed_signed_url_keeps_its_signature_out_of_the_error(server: Running) -> None:
    message = refusal(f"{server.base_url}/status/404?token=s3cr3t&sig=abc", policy())
    assert "s3cr3t" not in message and "abc" not in message
    assert "token=…" in message and "404" in message


@pytest.mark.parametrize(
    ("content", "size_at_open", "expected"),
    [(500, 500, 500), (500, 100, 500), (3000, 100, 1001), (3000, 3000, 1001), (0, 0, 0)],
)
def test_a_file_is_read_up_to_the_limit_even_if_it_grew_after_its_size_was_asked(
    content: int, size_at_open: int, expected: int
) -> None:
    """Reads ask for the file's size plus one byte (not LV_MAX_IMAGE_BYTES for every image);
    a file that grew in between is still read on to the limit, so its size check holds."""
    from worker.fetch.files import _read_up_to

    data = _read_up_to(io.BytesIO(b"x" * content), size_at_open, limit=1001)

    assert len(data) == expected
