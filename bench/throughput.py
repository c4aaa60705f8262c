"""Throughput benchmarks: the model alone (images/s per batch size) and the whole pipeline
(listings/s from enqueue to committed result, with and without dynamic batching).

    python -m bench.throughput [--quick]

Writes bench/results/<date>-<device>.json. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import json
import platform
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from contract.broker import STATS_COMMAND
from contract.registry import get_spec, load_registry
from contract.settings import Settings, load_settings
from db.engine import make_engine
from db.migrate import upgrade
from listing_vision.demo.catalogue import COLOURS, PRODUCTS, draw_product
from listing_vision.embedded import EmbeddedServers
from listing_vision.supervisor import Child, child_env, stop_children
from producer.enqueue import Producer
from worker.backends import create_backend
from worker.main import worker_name

RESULTS = Path(__file__).with_name("results")
REGISTRY = """
[models.vit-b32-random]
backend = "open_clip"
name = "ViT-B-32"
threshold = 0.25
"""


def bench_model(
    registry: dict[str, Any], model_id: str, batch_sizes: list[int], seconds: float
) -> list[dict[str, Any]]:
    """Images/s of `embed_images` alone (preprocessed input, warm model)."""
    backend = create_backend(get_spec(registry, model_id))
    info = backend.load()
    rows = []
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, info.image_size, info.image_size)
        backend.embed_images(pixels)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            backend.embed_images(pixels)
            done += batch
        if backend.device.type == "cuda":
            torch.cuda.synchronize()
        rate = done / (time.perf_counter() - start)
        rows.append({"model": model_id, "batch": batch, "images_per_s": round(rate, 1)})
        print(f"  model {model_id:16} batch {batch:4}: {rate:8.1f} img/s", flush=True)
    return rows


def bench_pipeline(
    settings: Settings, images: list[Path], model_id: str, batch_max_size: int
) -> dict[str, Any]:
    """Listings/s through a real worker process, one message per listing."""
    env = child_env(
        settings,
        LV_MODELS_FILE=str(settings.models_file),
        LV_FILE_ROOTS=str(images[0].parent),
        LV_BATCH_MAX_SIZE=str(batch_max_size),
        LV_BATCH_MAX_WAIT_MS="20",
        LV_LOG_LEVEL="INFO",
        LV_HOME=str(settings.home),
    )
    log = settings.home / f"worker-{model_id}-{batch_max_size}.log"
    worker = Child(
        "bench-worker",
        [sys.executable, "-m", "listing_vision", "worker", "--model", model_id],
        env,
        log_path=log,
        restart=False,
    )
    worker.start()
    try:
        deadline = time.monotonic() + 300
        while "ready." not in log.read_text(errors="replace"):
            if time.monotonic() > deadline or (
                worker.process and worker.process.poll() is not None
            ):
                raise RuntimeError(log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        run_id = f"{model_id}-{batch_max_size}-{time.time_ns()}"
        events = [
            {"listing_id": f"{run_id}-{i}", "title": f"listing {i}", "image_url": p.as_uri()}
            for i, p in enumerate(images)
        ]
        with Producer(settings) as producer:
            start = time.perf_counter()
            report = producer.enqueue(events, model=model_id)
            counts = producer.wait(report.job_ids, timeout=1800, poll_interval=0.1)
            elapsed = time.perf_counter() - start
            name = worker_name(model_id, None)
            stats = producer.celery.control.broadcast(
                STATS_COMMAND, reply=True, destination=[name], timeout=10
            )
    finally:
        stop_children([worker], timeout=60)
    calls = stats[0][name]["model_calls"] if stats else {}
    row = {
        "model": model_id,
        "batch_max_size": batch_max_size,
        "listings": len(images),
        "succeeded": counts["succeeded"],
        "seconds": round(elapsed, 2),
        "listings_per_s": round(len(images) / elapsed, 1),
        "image_calls": calls.get("image_calls"),
    }
    print(
        f"  pipeline {model_id:16} max batch {batch_max_size:3}: "
        f"{row['listings_per_s']:7.1f} listings/s "
        f"({row['image_calls']} image calls for {len(images)} listings)",
        flush=True,
    )
    return row


def draw_images(directory: Path, count: int, seed: int, size: int = 256) -> list[Path]:
    """Fresh drawings per run: images a model has embedded before would be served from the
    embeddings table, and the run would measure the cache instead of the model."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"bench-{seed}-{i:05d}.jpg"
        draw_product(rng.choice(list(COLOURS)), rng.choice(PRODUCTS), rng, size).save(
            path, quality=90
        )
        paths.append(path)
    return paths


def main() -> None:
    quick = "--quick" in sys.argv
    device = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{platform.machine()}"
    )
    result: dict[str, Any] = {
        "date": date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        models_file = scratch / "models.toml"
        models_file.write_text(REGISTRY)
        registry = load_registry(models_file)
        sizes = [1, 8, 32] if quick or device.startswith("cpu") else [1, 32, 128, 256]
        print("model alone:", flush=True)
        result["model"] = [
            row
            for m in ("lv-toy", "vit-b32-random")
            for row in bench_model(registry, m, sizes, 3 if quick else 8)
        ]
        count = 64 if quick else 256
        print("pipeline (embedded PostgreSQL and Valkey, one worker process):", flush=True)
        home = scratch / "home"
        with EmbeddedServers(home) as urls:
            settings = load_settings(
                home=str(home), models_file=str(models_file), file_roots=str(scratch / "images")
            ).with_servers(urls.database_url, urls.broker_url)
            engine = make_engine(settings.require_database_url())
            upgrade(engine)
            engine.dispose()
            runs = [(m, size) for m in ("lv-toy", "vit-b32-random") for size in (1, 64)]
            result["pipeline"] = [
                bench_pipeline(settings, draw_images(scratch / "images", count, seed), m, size)
                for seed, (m, size) in enumerate(runs)
            ]
    RESULTS.mkdir(exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    out = RESULTS / f"{result['date']}-{slug}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
