"""A worker's Prometheus metrics (LV_METRICS_PORT), scraped over HTTP and parsed with
prometheus_client's own parser."""

from __future__ import annotations

import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import images
from tests.integration.conftest import Stack, free_port, start_worker, stop_worker

pytestmark = pytest.mark.slow
MODEL = "tiny-batch"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_worker_exports_jobs_stages_batches_and_load_time(
    stack: Stack, worker_env: dict[str, str], producer: Any, image_root: Path, tmp_path: Path
) -> None:
    port = free_port()
    tag = uuid.uuid4().hex[:6]
    good = [
        images.save(images.product_image(c, "circle", (61, 59)), image_root / f"m-{tag}-{c}.jpg")
        for c in ("red", "blue")
    ]
    bad = images.truncated_jpeg(image_root / f"m-{tag}-bad.jpg")
    events = [
        {"listing_id": f"metrics-{tag}-{i}", "title": "t", "image_url": path.as_uri()}
        for i, path in enumerate([*good, bad])
    ]
    worker = start_worker(
        stack, {**worker_env, "LV_METRICS_PORT": str(port)}, tmp_path / "w.log", model=MODEL
    )
    try:
        report = producer.enqueue(events, model=MODEL)
        counts = producer.wait(report.job_ids, timeout=90, poll_interval=0.2)
        metrics = scrape(port)
    finally:
        stop_worker(worker)

    assert counts["succeeded"] == 2 and counts["failed"] == 1, worker.log()[-2000:]
    model = (("model", MODEL),)
    assert metrics[("lv_jobs_total", (("model", MODEL), ("outcome", "succeeded")))] == 2
    assert metrics[("lv_jobs_total", (("model", MODEL), ("outcome", "failed")))] == 1
    for stage in ("queue_wait", "claim", "fetch", "decode", "write"):
        key = ("lv_job_stage_seconds_count", (("model", MODEL), ("stage", stage)))
        assert metrics[key] == 3, stage
    assert metrics[("lv_job_stage_seconds_count", (("model", MODEL), ("stage", "infer")))] == 2
    image_items = metrics[("lv_embedded_items_total", (("model", MODEL), ("tower", "image")))]
    assert image_items == 2
    calls = metrics[("lv_model_call_items_count", (("model", MODEL), ("tower", "image")))]
    assert 1 <= calls <= 2  # the two good images, batched when they arrived together
    assert metrics[("lv_model_load_seconds", model)] > 0
