"""Loopback HTTP(S) servers for the fetch tests: one handler, one route per misbehaviour."""

from __future__ import annotations

import gzip
import io
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from PIL import Image

IMAGE_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
OVERSIZE = 10_000  # bytes sent by the oversize routes; tests use a 1000-byte limit
STREAM_LIMIT = 4 << 20  # an endless body stops here, so a buggy client cannot hang the suite


@dataclass(frozen=True)
class Seen:
    """One request as the server saw it."""

    path: str
    host: str | None
    user_agent: str | None


class RecordingServer(ThreadingHTTPServer):
    """Remembers every request; `stop` releases handlers that are stalling or dripping."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self.requests: list[Seen] = []
        self.server_names: list[str | None] = []
        self.stop = threading.Event()
        super().__init__(address, Handler)


GZIP_BOMB = gzip.compress(gzip.compress(b"\0" * 50_000_000))


class Handler(BaseHTTPRequestHandler):
    """One instance per connection: it serves every request that connection carries."""

    protocol_version = "HTTP/1.1"
    server: RecordingServer
    served = 0  # requests answered on this connection before the current one

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output clean."""

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        self.server.requests.append(
            Seen(parts.path, self.headers.get("Host"), self.headers.get("User-Agent"))
        )
        route, _, arg = parts.path.strip("/").partition("/")
        name = route.replace("-", "_").replace(".", "_")
        handler = getattr(self, f"route_{name}", None)
        if handler is None:
            self.reply(404, b"not found")
            return
        handler(arg, parse_qs(parts.query))
        self.served += 1

    def reply(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def route_image_jpg(self, arg: str, query: dict[str, list[str]]) -> None:
        self.reply(200, IMAGE_BYTES, Content_Type="image/png")

    def route_hang_up_if_reused(self, arg: str, query: dict[str, list[str]]) -> None:
        """The image on a new connection; on a kept one, hang up without answering (as a server
        does that closed an idle connection the moment the request arrived)."""
        if self.served:
            self.close_connection = True
            return
        self.route_image_jpg(arg, query)

    def route_hang_up(self, arg: str, query: dict[str, list[str]]) -> None:
        """Read the request, close the connection, answer nothing."""
        self.close_connection = True

    def route_redirect_with_body(self, arg: str, query: dict[str, list[str]]) -> None:
        """A redirect with a body (which the client leaves unread, so its connection ends)."""
        self.reply(302, b"moved, see Location", Location=query["to"][0])

    def route_image_and_more(self, arg: str, query: dict[str, list[str]]) -> None:
        """The image, and in the same write a whole second response nobody asked for."""
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(IMAGE_BYTES)}\r\n\r\n".encode()
        self.wfile.write(head + IMAGE_BYTES + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
        self.wfile.flush()

    def route_image_then_stray(self, arg: str, query: dict[str, list[str]]) -> None:
        """The image; 50 ms later, on the same connection, a whole response nobody asked for."""
        self.route_image_jpg(arg, query)
        self.wfile.flush()
        self.server.stop.wait(0.05)
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
        self.wfile.flush()

    def route_slow(self, arg: str, query: dict[str, list[str]]) -> None:
        """/slow/S answers a real JPEG after S seconds (sooner if the server stops)."""
        self.server.stop.wait(float(arg))
        picture = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 30, 30)).save(picture, format="JPEG")
        self.reply(200, picture.getvalue(), Content_Type="image/jpeg")

    def route_versioned_jpg(self, arg: str, query: dict[str, list[str]]) -> None:
        """The image at version "v1": a matching If-None-Match is answered 304."""
        if self.headers.get("If-None-Match") == '"v1"':
            self.reply(304, ETag='"v1"')
            return
        self.reply(200, IMAGE_BYTES, ETag='"v1"', Last_Modified="Mon, 23 Nov 2026 10:00:00 GMT")

    def route_status(self, arg: str, query: dict[str, list[str]]) -> None:
        self.reply(int(arg), b"status body")

    def route_redirect(self, arg: str, query: dict[str, list[str]]) -> None:
        """/redirect/N redirects N+1 times before reaching the image."""
        left = int(arg)
        self.reply(302, Location="/image.jpg" if left == 0 else f"/redirect/{left - 1}")

    def route_redirect_code(self, arg: str, query: dict[str, list[str]]) -> None:
        self.reply(int(arg), Location="/image.jpg")

    def route_redirect_to(self, arg: str, query: dict[str, list[str]]) -> None:
        self.reply(302, Location=query["to"][0])

    def route_no_location(self, arg: str, query: dict[str, list[str]]) -> None:
        self.reply(302)

    def route_loop(self, arg: str, query: dict[str, list[str]]) -> None:
        self.reply(302, Location="/loop")

    def route_big(self, arg: str, query: dict[str, list[str]]) -> None:
        self.reply(200, b"x" * OVERSIZE, Content_Type="image/jpeg")

    def route_big_close_delimited(self, arg: str, query: dict[str, list[str]]) -> None:
        """No Content-Length: the body ends when the connection closes (HTTP/1.0 style)."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.stream(lambda chunk: chunk)

    def route_big_chunked(self, arg: str, query: dict[str, list[str]]) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.stream(lambda chunk: b"%x\r\n%s\r\n" % (len(chunk), chunk))

    def stream(self, frame: Callable[[bytes], bytes]) -> None:
        """Send 1 KB chunks until the client hangs up (or STREAM_LIMIT, as a safety net)."""
        chunk = b"y" * 1024
        try:
            for _ in range(STREAM_LIMIT // len(chunk)):
                self.wfile.write(frame(chunk))
                self.wfile.flush()
        except OSError:
            return

    def route_drip(self, arg: str, query: dict[str, list[str]]) -> None:
        """Promise 1000 bytes, send one every 0.2 s: each read succeeds, the body never ends.

        It gives up after 5 s, so a client without a deadline fails the test instead of hanging.
        """
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(25):
                if self.server.stop.wait(0.2):
                    return
                self.wfile.write(b"z")
                self.wfile.flush()
        except OSError:
            return

    def route_gzip_bomb(self, arg: str, query: dict[str, list[str]]) -> None:
        """A few hundred bytes that decode (twice gunzipped) to 50 MB, despite identity asked."""
        self.reply(200, GZIP_BOMB, Content_Type="image/jpeg", Content_Encoding="gzip, gzip")

    def route_short_body(self, arg: str, query: dict[str, list[str]]) -> None:
        """Promise 1000 bytes, send 10, hang up."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"0123456789")
        self.wfile.flush()

    def route_not_http(self, arg: str, query: dict[str, list[str]]) -> None:
        """Whatever this is, it is not an HTTP response."""
        self.close_connection = True
        self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\nnot http at all\r\n")
        self.wfile.flush()

    def route_huge_headers(self, arg: str, query: dict[str, list[str]]) -> None:
        """200 KB of headers before any body."""
        self.close_connection = True
        self.send_response(200)
        for i in range(200):
            self.send_header(f"X-Filler-{i}", "f" * 1000)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_drip_headers(self, arg: str, query: dict[str, list[str]]) -> None:
        """The status line, then one header byte every 0.25 s: every read succeeds, the
        headers never end (until the server stops, or after 6 s)."""
        self.close_connection = True
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            self.wfile.flush()
            for _ in range(24):
                if self.server.stop.wait(0.25):
                    return
                self.wfile.write(b"a")
                self.wfile.flush()
        except OSError:
            return

    def route_stall(self, arg: str, query: dict[str, list[str]]) -> None:
        """Accept the request and answer nothing for 5 s (or until the server stops)."""
        self.server.stop.wait(5)


@dataclass
class Running:
    """A started server: its base URL and what it saw."""

    server: RecordingServer
    host: str
    port: int
    base_url: str
    tls_server_names: list[str | None] = field(default_factory=list)

    @property
    def requests(self) -> list[Seen]:
        return self.server.requests


@contextmanager
def serve(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Iterator[Running]:
    """Run a RecordingServer on host:0 in a thread for the duration of the block."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = RecordingServer((host, 0), family)
    port = server.server_address[1]
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    running = Running(server, host, port, f"{'https' if tls else 'http'}://{netloc}")
    if tls is not None:
        tls.sni_callback = lambda sock, name, ctx: running.tls_server_names.append(name)
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield running
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def make_certificate(directory: Path, hostname: str) -> tuple[Path, Path] | None:
    """A self-signed certificate valid only for `hostname` (no IP SAN), or None without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = [
        openssl,
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "2",
        "-subj",
        f"/CN={hostname}",
        "-addext",
        f"subjectAltName=DNS:{hostname}",
    ]
    done = subprocess.run(command, capture_output=True, timeout=30, check=False)
    return (cert, key) if done.returncode == 0 else None
