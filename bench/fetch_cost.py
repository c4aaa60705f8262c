"""CPU per image fetch over loopback http and https, kept connections against fresh ones.

    python -m bench.fetch_cost [--out DIR]

Writes `<date>-fetch-<device>.json` and a PNG beside it. Rows, all in one run (the machine is
shared, so only ratios within a run count):

- **kept**: `fetch_image` as the worker runs it, steady state (connection, TLS session and the
  host's answer kept from the fetch before);
- **fresh**: the same with everything forgotten before each fetch: a new verifying TLS context
  (the CA bundle loaded), a new connection and a new lookup per image, which is what every fetch
  cost before connections were kept;
- **floor**: the standard library's `http.client` on one kept connection, no guard, no limits.

CPU is the client process's (`time.process_time`: the resolver thread included, the server,
a child process, not); on loopback the kernel's receive path runs in the sender, so part of every
row is the server's network stack.
"""

from __future__ import annotations

import argparse
import http.client
import io
import ipaddress
import json
import ssl
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from bench.image_server import certificate, image_server
from bench.machine import device_label
from worker.fetch import FetchPolicy, addresses, connections, fetch_image

HOST = "localhost"  # a name, so the lookup (and the kept answer) is part of every fetch
RESULTS = Path(__file__).resolve().parent / "results"


def per_fetch(fetch: Callable[[], Any], count: int) -> dict[str, float]:
    """CPU and wall milliseconds per call of `fetch`, after a few warm-up calls."""
    for _ in range(3):
        fetch()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        fetch()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "fetches": count,
        "cpu_ms_per_fetch": round(1000 * cpu / count, 3),
        "wall_ms_per_fetch": round(1000 * wall / count, 3),
    }


def fresh(fetch: Callable[[], Any]) -> Callable[[], Any]:
    def forgetting() -> Any:
        connections.forget_connections()
        addresses.forget_answers()
        return fetch()

    return forgetting


def floor(scheme: str, port: int, tls: ssl.SSLContext) -> Callable[[], bytes]:
    """http.client on one kept connection: what a GET costs with nothing around it."""
    if scheme == "https":
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            HOST, port, context=tls
        )
    else:
        connection = http.client.HTTPConnection(HOST, port)

    def get() -> bytes:
        connection.request("GET", "/image.jpg")
        return connection.getresponse().read()

    return get


def measure(scratch: Path, kept_count: int, fresh_count: int) -> dict[str, Any]:
    picture = io.BytesIO()
    Image.new("RGB", (256, 256), (30, 120, 200)).save(picture, format="JPEG", quality=90)
    (scratch / "image.jpg").write_bytes(picture.getvalue())
    cert, key = certificate(scratch, HOST)

    def trusting_context() -> ssl.SSLContext:  # what production builds, plus the test cert
        context = httpx.create_ssl_context(trust_env=False)
        context.load_verify_locations(cafile=str(cert))
        return context

    built_by = connections._new_tls_context
    connections._new_tls_context = trusting_context
    try:
        return _measure_rows(
            scratch, cert, key, len(picture.getvalue()), trusting_context, kept_count, fresh_count
        )
    finally:
        connections._new_tls_context = built_by
        connections.forget_connections()


def _measure_rows(
    scratch: Path,
    cert: Path,
    key: Path,
    image_bytes: int,
    trusting_context: Callable[[], ssl.SSLContext],
    kept_count: int,
    fresh_count: int,
) -> dict[str, Any]:
    loopback = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    policy = FetchPolicy(max_bytes=10_000_000, timeout=10.0, allowed_private_networks=loopback)
    rows: dict[str, Any] = {"image_bytes": image_bytes}
    for scheme, tls in (("http", None), ("https", (cert, key))):
        with image_server(scratch, tls) as port:
            url = f"{scheme}://{HOST}:{port}/image.jpg"

            def fetch(url: str = url) -> Any:
                return fetch_image(url, policy)

            connections.forget_connections()
            rows[f"{scheme}_kept"] = per_fetch(fetch, kept_count)
            rows[f"{scheme}_fresh"] = per_fetch(fresh(fetch), fresh_count)
            rows[f"{scheme}_floor"] = per_fetch(floor(scheme, port, trusting_context()), kept_count)
            kept, was = rows[f"{scheme}_kept"], rows[f"{scheme}_fresh"]
            rows[f"{scheme}_kept_vs_fresh_cpu"] = round(
                kept["cpu_ms_per_fetch"] / was["cpu_ms_per_fetch"], 4
            )
            rows[f"{scheme}_kept_vs_floor_cpu"] = round(
                kept["cpu_ms_per_fetch"] / rows[f"{scheme}_floor"]["cpu_ms_per_fetch"], 2
            )
            print(
                f"{scheme}: kept {kept['cpu_ms_per_fetch']:.2f} ms CPU a fetch, "
                f"fresh {was['cpu_ms_per_fetch']:.2f}, "
                f"http.client {rows[f'{scheme}_floor']['cpu_ms_per_fetch']:.2f}",
                flush=True,
            )
    return rows


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{s}_{k}" for s in ("http", "https") for k in ("fresh", "kept", "floor")]
    values = [result[name]["cpu_ms_per_fetch"] for name in names]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    bars = ax.barh(names, values, color="#4472c4")
    for bar, value in zip(bars, values, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.2f}", va="center")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("client CPU ms per fetch (log scale)")
    ax.set_title(f"Image fetch over loopback, {result['device']}, {result['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="fewer fetches: see it work")
    args = parser.parse_args()
    kept_count, fresh_count = (50, 10) if args.quick else (1000, 60)
    with tempfile.TemporaryDirectory(prefix="lv-fetch-bench-") as scratch:
        rows = measure(Path(scratch), kept_count, fresh_count)
    result = {"date": date.today().isoformat(), "device": device_label(), **rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{result['date']}-fetch-{result['device'].replace('_', '-')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png", flush=True)


if __name__ == "__main__":
    main()
