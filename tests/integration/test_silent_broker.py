"""A broker that accepts connections and never answers (issue 14 #6): the producer fails fast
with a clear error, and nothing is lost: the jobs stay recorded, unsent, for the reconciler."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from contract.settings import load_settings
from producer.enqueue import Producer
from tests.integration.conftest import Stack, query

pytestmark = pytest.mark.slow


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A TCP listener on loopback that accepts and then says nothing, ever."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    listener.close()


def test_enqueue_against_a_silent_broker_fails_fast_and_keeps_the_jobs(
    stack: Stack, silent_broker: str
) -> None:
    settings = load_settings(broker_timeout=1.0).with_servers(stack.database_url, silent_broker)
    events: list[dict[str, Any]] = [
        {"listing_id": f"silent-{i}", "title": "t", "image_url": "https://x.test/a.jpg"}
        for i in range(3)
    ]
    started = time.monotonic()
    with Producer(settings) as producer, pytest.raises(Exception) as raised:
        producer.enqueue(events, model="lv-toy")
    elapsed = time.monotonic() - started

    assert elapsed < 20, elapsed  # without timeouts it blocks forever
    assert "timeout" in str(raised.value).lower()
    rows = query(
        stack,
        "SELECT status, sent_at FROM jobs WHERE listing_id LIKE 'silent-%' AND model_id = 'lv-toy'",
    )
    assert len(rows) == 3
    assert all(row["status"] == "queued" and row["sent_at"] is None for row in rows)
