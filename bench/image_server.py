"""A loopback image server for the benchmarks: a directory over HTTP/1.1 keep-alive (and TLS
with a throwaway certificate), as a CDN serves a catalogue's images.

    python -m bench.image_server DIR [--tls CERT KEY]    (prints its port, then serves)

Nagle's algorithm is off, as on any real web server: Python's handler writes the headers and the
body separately, and with Nagle on, a kept connection waits out the client's delayed ACK (about
40 ms) on every response.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: thousands of requests a run."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    args = parser.parse_args()
    handler = functools.partial(_Handler, directory=str(args.directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if args.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*args.tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()


@contextmanager
def image_server(directory: Path, tls: tuple[Path, Path] | None = None) -> Iterator[int]:
    """This module in a child process (its CPU is not the client's) for the block; its port."""
    argv = [sys.executable, "-m", "bench.image_server", str(directory)]
    if tls is not None:
        argv += ["--tls", str(tls[0]), str(tls[1])]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        yield int(child.stdout.readline())
    finally:
        child.terminate()
        child.wait(10)


def certificate(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for `hostname` (openssl), and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SystemExit("openssl is needed for the https measurement")
    cert, key = directory / "cert.pem", directory / "key.pem"
    request = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    output = ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"]
    names = ["-subj", f"/CN={hostname}", "-addext", f"subjectAltName=DNS:{hostname}"]
    subprocess.run(
        [openssl, *request, *output, *names],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


if __name__ == "__main__":
    main()
