"""Catalogue-scale runs on this machine with `lv-toy` (issue 12): reindex backfill, unchanged
rescoring at two sizes, rescoring after a category-list change; listings/s and peak memory.
First, the catalogue (each listing its own image) reindexed to a simulated ViT-L-14 (H100
timings, 768 dimensions), where PostgreSQL's HNSW index matters: its rate against the simulated
model alone, and how long the index build before the switch took.

    python -m bench.runs [--quick]

Writes bench/results/<date>-runs-<device>.json. Not a test: the numbers depend on the machine;
the reindex rate is also given as a ratio to the model-only rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import psutil
import torch

from bench.machine import device_label
from bench.plots import plot_runs
from bench.throughput import REGISTRY as SIM_REGISTRY
from bench.throughput import model_only_listings
from contract.registry import get_spec, load_registry
from contract.settings import Settings, load_settings
from db.engine import make_engine, make_sessions
from db.listings import upsert_listings
from db.migrate import upgrade
from db.records import ListingRecord
from listing_vision.demo.catalogue import COLOURS, PRODUCTS, draw_product
from listing_vision.embedded import EmbeddedServers
from listing_vision.supervisor import Child, child_env, stop_children
from producer.enqueue import Producer
from producer.runs import RunProducer
from worker.backends import create_backend

RESULTS = Path(__file__).with_name("results")
SIM_MODEL = "sim-vit-l14"


def model_only_rate(seconds: float = 5.0, batch: int = 64) -> float:
    """Images/s of lv-toy's image encoder alone (preprocessed input, warm), in this run."""
    backend = create_backend(get_spec(load_registry(), "lv-toy"))
    info = backend.load()
    pixels = torch.randn(batch, 3, info.image_size, info.image_size)
    backend.embed_images(pixels)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        backend.embed_images(pixels)
        done += batch
    return done / (time.perf_counter() - start)


def draw_images(directory: Path, count: int) -> list[Path]:
    rng = random.Random(12)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"img-{i:05d}.jpg"
        draw_product(rng.choice(list(COLOURS)), rng.choice(PRODUCTS), rng, 96).save(
            path, quality=85
        )
        paths.append(path)
    return paths


def add_listings(settings: Settings, images: list[Path], start: int, count: int) -> None:
    """Listings `start`..`start+count`, each showing one of the images (the catalogue's own
    ingestion is not what is measured here)."""
    engine = make_engine(settings.require_database_url())
    rng = random.Random(start)
    with make_sessions(engine).begin() as session:
        for first in range(start, start + count, 5000):
            batch = []
            for i in range(first, min(first + 5000, start + count)):
                colour, product = rng.choice(list(COLOURS)), rng.choice(PRODUCTS)
                batch.append(
                    ListingRecord(
                        f"bench-{i:07d}",
                        f"{colour} {product}, item {i}",
                        None,
                        product,
                        [images[i % len(images)].as_uri()],
                    )
                )
            upsert_listings(session, batch)
    engine.dispose()


class PeakMemory:
    """Samples a process's resident memory in a thread; `peak` in MB."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss / 1e6)
            except psutil.Error:
                return


@contextmanager
def worker(settings: Settings, log: Path, model: str = "lv-toy", **env: str) -> Iterator[Child]:
    child = Child(
        "bench-worker",
        [sys.executable, "-m", "listing_vision", "worker", "--model", model],
        child_env(
            settings,
            LV_LOG_LEVEL="INFO",
            LV_HOME=str(settings.home),
            LV_MODEL=settings.model,
            LV_FILE_ROOTS=":".join(str(root) for root in settings.file_roots),
            **({"LV_MODELS_FILE": str(settings.models_file)} if settings.models_file else {}),
            **env,
        ),
        log_path=log,
        restart=False,
    )
    child.start()
    try:
        deadline = time.monotonic() + 180
        while "ready." not in log.read_text(errors="replace"):
            if time.monotonic() > deadline or (child.process and child.process.poll() is not None):
                raise RuntimeError(log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        yield child
    finally:
        stop_children([child], timeout=60)


def timed_run(settings: Settings, start: Any, child: Child) -> dict[str, Any]:
    """Start a run with `start(run_producer)`, wait for it; its rate and the peak memory."""
    assert child.process is not None
    with Producer(settings) as producer, PeakMemory(child.process.pid) as memory:
        producer_memory = PeakMemory(psutil.Process().pid)
        with producer_memory:
            runs = RunProducer(producer)
            run_id: uuid.UUID = start(runs)
            while True:
                with producer.sessions() as session:
                    run = runs_row(session, run_id)
                if run["status"] not in ("pending", "running"):
                    break
                time.sleep(0.2)
    seconds = (run["finished_at"] - run["started_at"]).total_seconds()
    row = {
        "kind": run["kind"],
        "status": run["status"],
        "listings": run["total"],
        "failed": run["failed"],
        "seconds": round(seconds, 2),
        "listings_per_s": round(run["total"] / seconds, 1),
        "worker_peak_rss_mb": round(memory.peak, 1),
        "producer_peak_rss_mb": round(producer_memory.peak, 1),
    }
    print(f"  {row}", flush=True)
    return row


def simulated_reindex(settings: Settings, scratch: Path, listings: int) -> dict[str, Any]:
    """The catalogue reindexed to a simulated ViT-L-14, against the simulated model alone doing
    what each listing needs from it (an image and a title)."""
    model_only = model_only_listings(load_registry(settings.models_file), SIM_MODEL, 256, 5.0)
    env = {"LV_INPUT_PATH": "tensor"}  # as a GPU host runs it
    with worker(settings, scratch / "worker-sim.log", SIM_MODEL, **env) as child:
        print(f"reindex of {listings:,} listings to simulated {SIM_MODEL}:", flush=True)
        row = timed_run(settings, lambda r: r.start_reindex(SIM_MODEL), child)
    row["model_only_listings_per_s"] = round(model_only, 1)
    row["ratio_to_model_only"] = round(row["listings_per_s"] / model_only, 3)
    row["index_build_and_switch_seconds"] = index_build_seconds(settings)
    print(f"  {row}", flush=True)
    return row


def index_build_seconds(settings: Settings) -> float:
    """For the last reindex run: from its last chunk's close to the run's completion, which
    is the HNSW index build (`db.run_completion`) and the switch."""
    from sqlalchemy import text

    engine = make_engine(settings.require_database_url())
    with make_sessions(engine)() as session:
        seconds = session.scalar(
            text(
                "SELECT extract(epoch FROM r.finished_at - max(c.updated_at)) FROM runs r "
                "JOIN run_chunks c USING (run_id) WHERE r.kind = 'reindex' "
                "GROUP BY r.run_id, r.finished_at ORDER BY r.finished_at DESC LIMIT 1"
            )
        )
    engine.dispose()
    return round(float(seconds), 2)


def runs_row(session: Any, run_id: uuid.UUID) -> dict[str, Any]:
    from sqlalchemy import text

    return dict(
        session.execute(text("SELECT * FROM runs WHERE run_id = :r"), {"r": run_id})
        .mappings()
        .one()
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.runs", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="2,000 and 10,000 listings")
    quick = parser.parse_args().quick
    small, large = (2_000, 10_000) if quick else (10_000, 100_000)
    device = device_label()
    result: dict[str, Any] = {
        "date": date.today().isoformat(),
        "device": device,
        "cpu_cores": psutil.cpu_count(),
        "torch": torch.__version__,
        "model": "lv-toy",
    }
    print("model alone:", flush=True)
    result["model_only_images_per_s"] = round(model_only_rate(), 1)
    print(f"  {result['model_only_images_per_s']} img/s", flush=True)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        images = draw_images(scratch / "images", small)
        home = scratch / "home"
        models_file = scratch / "models.toml"
        models_file.write_text(SIM_REGISTRY)
        with EmbeddedServers(home) as urls:
            settings = load_settings(
                home=str(home),
                file_roots=str(scratch / "images"),
                model="clip-vit-b32",
                models_file=str(models_file),
            ).with_servers(urls.database_url, urls.broker_url)
            engine = make_engine(settings.require_database_url())
            upgrade(engine)
            engine.dispose()
            add_listings(settings, images, 0, small)
            result["reindex_simulated_vit_l14"] = simulated_reindex(settings, scratch, small)
            with worker(settings, scratch / "worker.log") as child:
                print(f"reindex backfill of {small:,} listings:", flush=True)
                reindex = timed_run(settings, lambda r: r.start_reindex("lv-toy"), child)
                reindex["ratio_to_model_only"] = round(
                    reindex["listings_per_s"] / result["model_only_images_per_s"], 3
                )
                result["reindex"] = reindex
                print(f"unchanged rescoring, {small:,} listings:", flush=True)
                result["rescore_unchanged_small"] = timed_run(
                    settings, lambda r: r.start_rescore(scope="all"), child
                )
                add_listings(settings, images, small, large - small)
                print(
                    f"analysing the {large - small:,} listings added (stale rescore):", flush=True
                )
                result["rescore_stale_added"] = timed_run(
                    settings, lambda r: r.start_rescore(scope="stale"), child
                )
                print(f"unchanged rescoring, {large:,} listings:", flush=True)
                result["rescore_unchanged_large"] = timed_run(
                    settings, lambda r: r.start_rescore(scope="all"), child
                )
            categories = scratch / "categories.txt"
            categories.write_text("\n".join([*PRODUCTS, "teapot", "bicycle", "guitar"]) + "\n")
            new_list = {"LV_CATEGORIES_FILE": str(categories)}
            with worker(settings, scratch / "worker-new-categories.log", **new_list) as child:
                print(f"rescoring {large:,} listings after a category-list change:", flush=True)
                result["rescore_new_categories"] = timed_run(
                    settings, lambda r: r.start_rescore(scope="all"), child
                )
    RESULTS.mkdir(exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    out = RESULTS / f"{result['date']}-runs-{slug}{'-quick' if quick else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    print(f"wrote {plot_runs(result, out.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
