"""bench.fetch_cost and bench.image_server run end to end on loopback (their figures are the
benchmark's business; here only that every row is measured and nothing is left patched)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.fetch_cost import measure
from bench.peer import PeerListing
from bench.throughput import event
from worker.fetch import connections


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
def test_every_row_is_measured_and_the_tls_context_is_restored(tmp_path: Path) -> None:
    built_by = connections._new_tls_context
    rows = measure(tmp_path, kept_count=3, fresh_count=1)
    for scheme in ("http", "https"):
        for kind in ("kept", "fresh", "floor"):
            row = rows[f"{scheme}_{kind}"]
            assert row["cpu_ms_per_fetch"] > 0 and row["wall_ms_per_fetch"] > 0
        assert rows[f"{scheme}_kept_vs_fresh_cpu"] > 0
    assert connections._new_tls_context is built_by


def test_an_event_names_its_image_by_file_url_or_under_an_http_base(tmp_path: Path) -> None:
    listing = PeerListing("l-1", "red mug", tmp_path / "l-1.jpg")
    assert event(listing)["image_url"] == (tmp_path / "l-1.jpg").as_uri()
    assert event(listing, "http://localhost:8080")["image_url"] == "http://localhost:8080/l-1.jpg"
