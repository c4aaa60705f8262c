"""Many single-listing messages share model calls; one bad image fails only its listing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from contract.broker import STATS_COMMAND
from producer.enqueue import Producer
from tests import images
from tests.integration.conftest import Stack, query, settings_from, start_worker, stop_worker
from worker.main import worker_name

pytestmark = pytest.mark.slow


def _stats(producer: Any, name: str) -> dict[str, Any]:
    replies = producer.celery.control.broadcast(
        STATS_COMMAND, reply=True, destination=[name], timeout=10
    )
    assert replies, f"no reply from {name}"
    stats: dict[str, Any] = replies[0][name]
    return stats


def test_64_single_listing_messages_are_served_in_few_model_calls(
    stack: Stack, worker_env: dict[str, str], producer: Any, image_root: Path, tmp_path: Path
) -> None:
    colours = ["red", "blue", "green", "gold", "purple", "teal", "black", "orange"]
    urls = []
    for i in range(63):
        path = image_root / f"batch-{i}.jpg"
        shape = ["circle", "square", "triangle"][i % 3]
        images.save(images.product_image(colours[i % 8], shape, (64 + i, 64)), path)  # distinct
        urls.append(path.as_uri())
    urls.insert(17, images.truncated_jpeg(image_root / "batch-bad.jpg").as_uri())
    events = [
        {"listing_id": f"b-{i:02d}", "title": f"listing {i}", "image_url": url}
        for i, url in enumerate(urls)
    ]
    worker = start_worker(stack, worker_env, tmp_path / "worker.log", model="tiny-batch")
    name = worker_name("tiny-batch", None)
    try:
        before = _stats(producer, name)
        # One message per listing (LV_ENQUEUE_GROUP=1): the worker batches across messages.
        with Producer(settings_from({**worker_env, "LV_ENQUEUE_GROUP": "1"})) as single:
            report = single.enqueue(events, model="tiny-batch")
        assert len(report.job_ids) == 64
        counts = producer.wait(report.job_ids, timeout=180)
        after = _stats(producer, name)
    finally:
        stop_worker(worker)
    assert counts["succeeded"] == 63 and counts["failed"] == 1, worker.log()[-3000:]
    image_calls = after["model_calls"]["image_calls"] - before["model_calls"]["image_calls"]
    text_calls = after["model_calls"]["text_calls"] - before["model_calls"]["text_calls"]
    # Batched across messages: on average at least two listings a call in each tower (a
    # loaded machine spreads deliveries, so no tighter count is promised).
    assert 0 < image_calls < 32 and 0 < text_calls < 32, after
    assert after["model_calls"]["images"] - before["model_calls"]["images"] == 63
    # Where the worker's CPU went, by kind of thread: the consumer, fetch and decode, the model.
    used = {
        kind: seconds - before["cpu_seconds_by_thread"].get(kind, 0.0)
        for kind, seconds in after["cpu_seconds_by_thread"].items()
    }
    # (The kernel counts in ticks of 10 ms: the fetch threads' share of 63 tiny images may
    # round to nothing, so only that they are counted is asserted.)
    assert used["MainThread"] > 0 and used["batcher-tiny-batch-run"] > 0, used
    assert "fetch" in used and "outcome-writer" in used, used
    rows = {
        r["listing_id"]: r
        for r in query(
            stack,
            "SELECT * FROM model_results WHERE model_id = 'tiny-batch' AND listing_id = ANY(:ids)",
            ids=[event["listing_id"] for event in events],
        )
    }
    assert rows["b-17"]["status"] == "failed" and "truncated" in rows["b-17"]["error"]
    assert all(r["status"] == "ok" for k, r in rows.items() if k != "b-17")
    sizes = query(
        stack,
        "SELECT batch_size FROM jobs WHERE job_id = ANY(:ids) AND status = 'succeeded'",
        ids=list(report.job_ids),
    )
    assert max(s["batch_size"] for s in sizes) > 1


def test_images_already_embedded_are_not_embedded_again_and_score_the_same(
    stack: Stack, worker: Any, producer: Any, image_root: Path
) -> None:
    """Issue 14's mutation probe (E) and (F): the embedding cache must really be used (counted
    image calls, not rows that ON CONFLICT keeps constant), and what it serves must score
    exactly as a fresh embedding did."""
    name = worker_name("tiny", None)
    paths = [
        images.save(
            images.product_image(colour, "circle", (70, 66)), image_root / f"c-{colour}.jpg"
        )
        for colour in ("red", "blue", "green")
    ]
    first = [
        {"listing_id": f"cache-{i}", "title": f"a {c} thing", "image_url": p.as_uri()}
        for i, (c, p) in enumerate(zip(("red", "blue", "green"), paths, strict=True))
    ]
    report = producer.enqueue(first, model="tiny")
    assert producer.wait(report.job_ids, timeout=120)["succeeded"] == 3, worker.log()[-2000:]
    before = _stats(producer, name)["model_calls"]
    scored = {
        r["listing_id"]: r["similarity"]
        for r in query(stack, "SELECT * FROM model_results WHERE listing_id LIKE 'cache-%'")
    }

    # New listings, same images (one more text each): no image may be embedded again.
    again = [{**event, "listing_id": f"again-{event['listing_id']}"} for event in first]
    report = producer.enqueue(again, model="tiny")
    assert producer.wait(report.job_ids, timeout=120)["succeeded"] == 3, worker.log()[-2000:]
    after = _stats(producer, name)["model_calls"]

    assert after["images"] == before["images"]
    assert after["texts"] > before["texts"]
    rescored = {
        r["listing_id"].removeprefix("again-"): r["similarity"]
        for r in query(stack, "SELECT * FROM model_results WHERE listing_id LIKE 'again-cache-%'")
    }
    assert rescored.keys() == scored.keys()
    for listing_id, similarity in scored.items():
        assert rescored[listing_id] == pytest.approx(similarity, abs=1e-5)
