"""A worker with `LV_DECODE_PROCESSES=2` decodes in real child processes and stores what a worker
decoding in its own threads stores: the same blur and brightness, the same similarities, the
same refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest

from tests import images
from tests.integration.conftest import Stack, WorkerProcess, query, start_worker, stop_worker
from worker.decode import decode_image
from worker.quality import measure_quality

pytestmark = pytest.mark.slow
MODEL = "tiny-batch"  # its own queue; the session's worker serves "tiny" the same weights


@pytest.mark.parametrize("pool_fetches", ["false", "true"], ids=["decodes", "fetches-too"])
def test_a_pool_of_decode_processes_stores_what_the_threads_store(
    pool_fetches: str,
    stack: Stack,
    worker: WorkerProcess,
    worker_env: dict[str, str],
    producer: Any,
    image_root: Path,
    tmp_path: Path,
) -> None:
    # Each case its own listings and image contents: nothing cached by the other case.
    tag, wider = ("poolf", 10) if pool_fetches == "true" else ("pool", 0)
    urls = []
    for i, (colour, shape) in enumerate(
        [("red", "circle"), ("blue", "square"), ("gold", "triangle")]
    ):
        path = image_root / f"{tag}-{i}.jpg"
        images.save(images.product_image(colour, shape, (90 + i + wider, 70)), path)
        urls.append(path.as_uri())
    teal = images.product_image("teal", "square", (96 + wider, 80))
    urls.append(images.save(teal, image_root / f"{tag}.png", "PNG").as_uri())
    urls.append(images.truncated_jpeg(image_root / f"{tag}-cut.jpg").as_uri())
    events = [
        {"listing_id": f"{tag}-{i}", "title": f"listing {i}", "image_url": url}
        for i, url in enumerate(urls)
    ]
    env = {
        **worker_env,
        "LV_DECODE_PROCESSES": "2",
        "LV_POOL_FETCHES": pool_fetches,
        "LV_INPUT_PATH": "tensor",
    }
    pooled = start_worker(stack, env, tmp_path / "worker.log", model=MODEL)
    try:
        children = psutil.Process(pooled.process.pid).children()
        spawned = [c for c in children if "multiprocessing" in " ".join(c.cmdline())]
        assert len(spawned) >= 2, [c.cmdline() for c in children]
        by_pool = producer.enqueue(events, model=MODEL)
        assert producer.wait(by_pool.job_ids, timeout=180)["succeeded"] == 4, pooled.log()[-3000:]
    finally:
        stop_worker(pooled)
    by_threads = producer.enqueue(events, model="tiny")
    assert producer.wait(by_threads.job_ids, timeout=180)["succeeded"] == 4, worker.log()[-3000:]

    rows = query(
        stack,
        "SELECT model_id, listing_id, status, error, similarity FROM results "
        "WHERE listing_id LIKE :tag ORDER BY listing_id",
        tag=f"{tag}-%",
    )
    pool_rows = {r["listing_id"]: r for r in rows if r["model_id"] == MODEL}
    thread_rows = {r["listing_id"]: r for r in rows if r["model_id"] == "tiny"}
    assert pool_rows.keys() == thread_rows.keys() == {e["listing_id"] for e in events}
    for listing_id, got in pool_rows.items():
        want = thread_rows[listing_id]
        assert (got["status"], got["error"]) == (want["status"], want["error"])
        if want["similarity"] is not None:
            assert got["similarity"] == pytest.approx(want["similarity"], abs=1e-5)
    cut = pool_rows[f"{tag}-4"]
    assert cut["status"] == "failed" and "truncated" in cut["error"]
    # The pool's blur and brightness (the first to store each image) are the thread's numbers.
    facts = query(
        stack,
        "SELECT i.blur, i.brightness, li.listing_id FROM listing_images li "
        "JOIN images i USING (sha256) WHERE li.listing_id LIKE :tag",
        tag=f"{tag}-%",
    )
    assert len(facts) == 4
    for row in facts:
        path = Path(urls[int(row["listing_id"].split("-")[1])].removeprefix("file://"))
        decoded = decode_image(path.read_bytes(), max_pixels=40_000_000, draft_size=256)
        want_quality = measure_quality(decoded.pixels)  # what a job's own thread measures
        assert row["blur"] == pytest.approx(want_quality.blur, rel=1e-5)
        assert row["brightness"] == pytest.approx(want_quality.brightness, rel=1e-6)
