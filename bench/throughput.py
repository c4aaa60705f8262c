"""Throughput and latency, each as a ratio to baselines measured in the same run (the box is
shared and noisy, so absolute numbers from different days do not compare):

1. the model alone: images/s of `embed_images` per batch size;
2. a no-op drain: messages/s of a worker shaped like `listing-vision worker` whose task does
   nothing (bench/noop_worker.py), the ceiling Celery and the broker allow;
3. the peer: a plain per-listing loop (bench/peer.py), the shape of the services replaced;
4. the pipeline: listings/s from the first enqueue to the last committed result through a real
   worker, as `enqueue` sends them (LV_ENQUEUE_GROUP jobs per message) at the default batch
   size and at a few others, and with one message per listing (against the no-op drain),
   once more with a decode process beside the worker (LV_DECODE_PROCESSES=1, reported);
5. latency under a trickle: enqueue-to-commit per listing at a steady low rate, idle worker;
6. a simulated accelerator (`backend = "sim"`): pipeline listings/s against the simulated
   model's own images/s, for four model sizes, on a GPU host's input path (`LV_INPUT_PATH=
   tensor`), and for the first once more on the PIL path;
7. real models on a CUDA host (bench/device_models.py: ViT-B-32, ViT-L-14, ViT-H-14-378,
   DINOv2-large, random weights) alone and through a worker, against the H100 targets;
8. with --profile, a py-spy flame graph of the worker during an extra pipeline run.

    python -m bench.throughput [--quick] [--profile]

Writes bench/results/<date>-<device>.json (`-quick` in the name with --quick) and a PNG beside
it. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import psutil
import psycopg
import torch

from bench.device_models import DEVICE_MODELS, device_checks, registry_text
from bench.image_server import image_server
from bench.machine import device_label
from bench.noop_worker import NODE as NOOP_NODE
from bench.peer import PeerListing, run_peer
from bench.plots import plot_throughput
from contract.broker import STATS_COMMAND, make_celery, model_queue, send_analysis
from contract.registry import Registry, get_spec, load_registry
from contract.settings import Settings, load_settings
from db.engine import make_engine
from db.migrate import upgrade
from listing_vision.demo.catalogue import COLOURS, PRODUCTS, draw_product
from listing_vision.embedded import EmbeddedServers
from listing_vision.supervisor import Child, child_env, stop_children
from producer.enqueue import Producer
from worker.backends import create_backend
from worker.backends.sim import SIMULATED, TEXT_COST_SHARE
from worker.main import worker_name

RESULTS = Path(__file__).with_name("results")
TOY = "lv-toy"
NOOP_QUEUE = model_queue("bench-noop")
DECODE_PROCESSES = 1  # LV_DECODE_PROCESSES of the extra single-message row
LOOPBACK = "127.0.0.0/8"  # LV_ALLOWED_PRIVATE_NETWORKS of the worker that fetches over http
IMAGE_SIZE = 256  # px, the JPEGs every pipeline, peer and simulated run reads
# Simulated accelerators: registry id -> (SIMULATED name, batch_max_size).
SIM_MODELS = {
    "sim-vit-h14-378": ("ViT-H-14-378-quickgelu", 128),
    "sim-vit-b32": ("ViT-B-32", 256),
    "sim-vit-l14": ("ViT-L-14", 256),
    "sim-dinov2-large": ("DINOv2-large", 256),
}
REGISTRY = """
[models.vit-b32-random]
backend = "open_clip"
name = "ViT-B-32"
threshold = 0.25
""" + "".join(
    f'\n[models.{model_id}]\nbackend = "sim"\nname = "{name}"\nbatch_max_size = {size}\n'
    for model_id, (name, size) in SIM_MODELS.items()
)
# name -> (comparison, target); a ratio without a target is reported, not judged.
TARGETS = {
    "pipeline_vs_noop_drain": (">=", 0.5),
    "pipeline_vs_peer": (">=", 3.0),
    "trickle_p95_ms": ("<=", 50.0),
    "sim_vit_h14_378_vs_model": (">=", 0.9),
}


@dataclass(frozen=True)
class Plan:
    """How much of each measurement a run does (--quick: enough to see it work)."""

    model_ids: tuple[str, ...]
    model_batches: tuple[int, ...]
    model_seconds: float
    noop_messages: int
    pipeline_listings: int
    batch_sweep: tuple[int, ...]  # LV_BATCH_MAX_SIZE values besides the default
    peer_listings: int
    trickle_events: int
    trickle_rate: float
    sim_listings: int  # listings per simulated run (rounded up to whole batches)
    sim_seconds: float


QUICK = Plan((TOY,), (1, 8, 32), 1.5, 1000, 400, (1, 8), 150, 60, 20.0, 512, 1.5)
# A simulated run is long enough (about 10 s at ViT-H's pace) that the start, before the first
# batch is fetched and while the producer commits the whole call, weighs as in a catalogue run
# of a few thousand listings, not as in one of a few seconds.
FULL = Plan(
    (TOY, "vit-b32-random"), (1, 8, 32, 64), 5.0, 5000, 2000, (1, 8, 32), 500, 200, 20.0, 3072, 5.0
)


# -- measurements in this process -------------------------------------------------------------


def bench_model(
    registry: Registry, model_id: str, batch_sizes: Sequence[int], seconds: float
) -> list[dict[str, Any]]:
    """Images/s of `embed_images` alone (preprocessed input, warm model)."""
    backend = create_backend(get_spec(registry, model_id))
    info = backend.load()
    rows = []
    for batch in batch_sizes:
        # On the model's device: its own pace, not a host-to-device copy per call.
        pixels = torch.randn(batch, 3, info.image_size, info.image_size, device=backend.device)
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


def model_only_listings(registry: Registry, model_id: str, batch: int, seconds: float) -> float:
    """Listings/s of the model alone (simulated or real) on the pipeline's own workload: per
    batch, one image call and (for a model with text) one call for the batch's titles."""
    backend = create_backend(get_spec(registry, model_id))
    info = backend.load()
    pixels = torch.randn(batch, 3, info.image_size, info.image_size, device=backend.device)
    backend.embed_images(pixels)  # warm-up (a first call on a GPU picks its kernels)
    texts = [f"listing title {i}" for i in range(batch)]
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        backend.embed_images(pixels)
        if info.has_text:
            backend.embed_texts(texts)
        done += batch
    return done / (time.perf_counter() - start)


def bench_peer(settings: Settings, registry: Registry, listings: Sequence[PeerListing]) -> dict:
    """The peer loop over the pipeline run's own files, in this process: once with torch's
    default threads and once with one (at batch 1 on a busy two-core box the default's
    intra-op threads can collapse it to a tenth); the faster is the peer the pipeline is
    compared with, so the comparison is against the peer at its best."""
    backend = create_backend(get_spec(registry, TOY))
    url = settings.require_database_url()
    default_threads, rates = torch.get_num_threads(), {}
    for threads in (default_threads, 1):
        torch.set_num_threads(threads)
        try:
            rates[threads] = run_peer(url, backend, TOY, listings)
        finally:
            torch.set_num_threads(default_threads)
        print(
            f"  peer {TOY}, {threads} torch threads: {rates[threads]:7.1f} listings/s", flush=True
        )
    best = max(rates, key=lambda threads: rates[threads])
    return {
        "model": TOY,
        "listings": len(listings),
        "listings_per_s": round(rates[best], 1),
        "torch_threads": best,
        "listings_per_s_by_torch_threads": {str(t): round(r, 1) for t, r in rates.items()},
    }


def simulated_bound(name: str, batch: int) -> float:
    """Listings/s the simulated device itself allows when each listing brings one image and one
    title: an image call and a text call per batch (no CPU work at all)."""
    sim = SIMULATED[name]
    seconds = sim.seconds(batch) + (sim.seconds(batch, TEXT_COST_SHARE) if sim.has_text else 0)
    return batch / seconds


# -- processes ---------------------------------------------------------------------------------


@contextlib.contextmanager
def started(name: str, argv: list[str], env: dict[str, str], log: Path) -> Iterator[Child]:
    """A child process, yielded once its log says Celery is ready; stopped on the way out."""
    child = Child(name, argv, env, log_path=log, restart=False)
    child.start()
    try:
        deadline = time.monotonic() + 300
        while "ready." not in log.read_text(errors="replace"):
            if time.monotonic() > deadline or (child.process and child.process.poll() is not None):
                raise RuntimeError(
                    f"{name} did not start:\n{log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.2)
        yield child
    finally:
        stop_children([child], timeout=60)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    return child_env(
        settings,
        LV_MODELS_FILE=str(settings.models_file),
        LV_FILE_ROOTS=":".join(str(root) for root in settings.file_roots),
        LV_LOG_LEVEL="INFO",
        LV_HOME=str(settings.home),
        **extra,
    )


def pipeline_worker(settings: Settings, model_id: str, tag: str, **env: str) -> Any:
    """`listing-vision worker --model MODEL_ID`, started and ready (a context manager)."""
    argv = [sys.executable, "-m", "listing_vision", "worker", "--model", model_id]
    log = settings.home / f"worker-{model_id}-{tag}.log"
    return started(f"worker {model_id}", argv, worker_env(settings, **env), log)


@contextlib.contextmanager
def flame_graph(pid: int, out: Path, log: Path) -> Iterator[dict[str, Any]]:
    """py-spy sampling process `pid` while the block runs; the yielded dict says how it went."""
    report: dict[str, Any] = {"flame_graph": None}
    argv = [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid)]
    argv += ["--rate", "200", "--format", "flamegraph", "--output", str(out), "--nonblocking"]
    try:
        with open(log, "wb") as output:
            spy = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
    except OSError as error:  # py-spy not installed: say so and measure on
        report["error"] = f"py-spy could not start: {error}"
        yield report
        return
    deadline = time.monotonic() + 15
    while "Sampling" not in log.read_text(errors="replace") and spy.poll() is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    try:
        yield report
    finally:
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
        if out.is_file():
            report["flame_graph"] = str(out)
        else:
            tail = log.read_text(errors="replace").strip()[-500:]
            report["error"] = f"py-spy wrote nothing (exit {spy.returncode}): {tail}"


# -- listings and results ----------------------------------------------------------------------


def draw_listings(directory: Path, prefix: str, count: int, seed: int) -> list[PeerListing]:
    """Fresh drawings per run: images a model has embedded before would be served from the
    embeddings table, and the run would measure the cache instead of the model. Titles are
    unique too."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    listings = []
    for i in range(count):
        colour, product = rng.choice(list(COLOURS)), rng.choice(PRODUCTS)
        path = directory / f"{prefix}-{i:05d}.jpg"
        draw_product(colour, product, rng, IMAGE_SIZE).save(path, quality=90)
        listings.append(PeerListing(f"{prefix}-{i:05d}", f"{colour} {product}, item {i}", path))
    return listings


def event(listing: PeerListing, image_base: str | None = None) -> dict[str, str]:
    """The listing's event; its image by `file://`, or under `image_base` (an http server of
    the images' directory)."""
    url = listing.image.as_uri() if image_base is None else f"{image_base}/{listing.image.name}"
    return {"listing_id": listing.listing_id, "title": listing.title, "image_url": url}


class ResultListener:
    """LISTEN listing_results on its own connection and thread: when each listing's result row
    was committed (PostgreSQL delivers a notification at commit), by listing id."""

    def __init__(self, database_url: str) -> None:
        self.arrivals: dict[str, float] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._connection = psycopg.connect(database_url, autocommit=True)
        self._connection.execute("LISTEN listing_results")
        self._thread = threading.Thread(target=self._loop, name="listener", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._connection.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for note in self._connection.notifies(timeout=0.2):
                arrived = time.perf_counter()
                listing_id = json.loads(note.payload)["listing_id"]
                with self._changed:
                    self.arrivals.setdefault(listing_id, arrived)
                    self._changed.notify_all()

    def wait_for(self, listing_ids: Collection[str], timeout: float) -> bool:
        """Whether every listing's row was committed within `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(
                lambda: all(i in self.arrivals for i in listing_ids), timeout
            )


# -- the measurements through processes --------------------------------------------------------


def bench_noop_drain(settings: Settings, count: int) -> dict[str, Any]:
    """Messages/s of a do-nothing worker of lv-toy's shape, once it is ready, two ways:
    `messages_per_s` times `count` messages from the first send until its queue and kombu's
    `unacked` hash are both empty (the pipeline's own shape: the sender shares the machine);
    `worker_drain_per_s` times a queue of `count` messages filled while the worker was not
    consuming it (remote control), so only the worker side is measured."""
    argv = [sys.executable, "-m", "bench.noop_worker", NOOP_QUEUE, "--model", TOY]
    app = make_celery(settings)
    with (
        started("bench-noop", argv, worker_env(settings), settings.home / "noop.log"),
        app.connection_for_write() as connection,
    ):
        client = connection.default_channel.client  # the broker's own Redis client
        send_analysis(app, [uuid.uuid4() for _ in range(50)], "bench-noop")  # warm-up
        drained_at(client, time.monotonic() + 60)
        start = time.perf_counter()
        send_analysis(app, [uuid.uuid4() for _ in range(count)], "bench-noop")
        sent = time.perf_counter()
        end = drained_at(client, time.monotonic() + 600)
        app.control.cancel_consumer(NOOP_QUEUE, destination=[NOOP_NODE], reply=True)
        send_analysis(app, [uuid.uuid4() for _ in range(count)], "bench-noop")
        resumed = time.perf_counter()
        app.control.add_consumer(NOOP_QUEUE, destination=[NOOP_NODE], reply=True)
        drained = drained_at(client, time.monotonic() + 600)
    row = {
        "messages": count,
        "seconds": round(end - start, 2),
        "send_seconds": round(sent - start, 2),
        "messages_per_s": round(count / (end - start), 1),
        "worker_drain_seconds": round(drained - resumed, 2),
        "worker_drain_per_s": round(count / (drained - resumed), 1),
    }
    print(
        f"  no-op drain: {row['messages_per_s']:7.1f} messages/s sent and drained "
        f"({count} messages, sending took {row['send_seconds']} s); "
        f"{row['worker_drain_per_s']:7.1f}/s from a full queue",
        flush=True,
    )
    return row


def drained_at(client: Any, deadline: float) -> float:
    """When the no-op queue and kombu's `unacked` hash were first seen empty (polled every
    10 ms, two cheap commands in one round trip)."""
    while time.monotonic() < deadline:
        pipe = client.pipeline(transaction=False)
        pipe.llen(NOOP_QUEUE)
        pipe.hlen("unacked")
        waiting, unacked = pipe.execute()
        if waiting == 0 and unacked == 0:
            return time.perf_counter()
        time.sleep(0.01)
    raise TimeoutError("the no-op worker did not drain its queue")


def timed_enqueue(
    producer: Producer,
    listener: ResultListener,
    model_id: str,
    listings: Sequence[PeerListing],
    image_base: str | None = None,
) -> dict[str, Any]:
    """Listings/s from the first enqueue to the last committed result, on a ready worker."""
    ids = [listing.listing_id for listing in listings]
    start = time.perf_counter()
    events = [event(listing, image_base) for listing in listings]
    report = producer.enqueue(events, model=model_id)
    counts = producer.wait(report.job_ids, timeout=1800, poll_interval=0.2)
    listener.wait_for(ids, timeout=10)
    arrivals = sorted(listener.arrivals[i] for i in ids if i in listener.arrivals)
    end = arrivals[-1] if arrivals else time.perf_counter()  # no notification: no result row
    return {
        "model": model_id,
        "listings": len(listings),
        "succeeded": counts["succeeded"],
        "seconds": round(end - start, 2),
        "listings_per_s": round(len(listings) / (end - start), 1),
        "steady_listings_per_s": steady_rate(arrivals),
    }


def steady_rate(arrivals: Sequence[float]) -> float | None:
    """Listings/s between the 10th and the 90th percentile of commit times: the pace once the
    run is under way, without its start (the producer's commit, the first fetches) and its
    tail (a last partial batch). Reported beside the whole run's rate, never instead of it."""
    if len(arrivals) < 20:
        return None
    low, high = len(arrivals) // 10, 9 * len(arrivals) // 10
    span = arrivals[high] - arrivals[low]
    return round((high - low) / span, 1) if span > 0 else None


def worker_stats(producer: Producer, name: str) -> dict[str, Any]:
    """The worker's lv_stats so far (model calls, CPU by thread), or {} when it does not
    answer."""
    replies = producer.celery.control.broadcast(
        STATS_COMMAND, reply=True, destination=[name], timeout=10
    )
    return dict(replies[0][name]) if replies else {}


def cpu_ms_per_listing(
    before: dict[str, float], after: dict[str, float], listings: int
) -> dict[str, float]:
    """The worker's CPU per listing by kind of thread over a run, largest first."""
    used = {kind: after[kind] - before.get(kind, 0.0) for kind in after}
    ranked = sorted(used.items(), key=lambda item: -item[1])
    return {kind: round(1000 * seconds / listings, 2) for kind, seconds in ranked if seconds > 0}


def measured_run(
    settings: Settings,
    listener: ResultListener,
    model_id: str,
    listings: Sequence[PeerListing],
    group: int | None = None,
    image_base: str | None = None,
) -> dict[str, Any]:
    """`timed_enqueue` of all but the first 8 listings, which warm the worker up first (first
    connections, first batch shapes); with the model calls the measured listings made.
    `group`: jobs per message (LV_ENQUEUE_GROUP; 1: single-listing messages), else the
    setting's default; `image_base`: images over http (`event`)."""
    name = worker_name(model_id, None)
    if group is not None:
        settings = settings.model_copy(update={"enqueue_group": group})
    with Producer(settings) as producer:
        timed_enqueue(producer, listener, model_id, listings[:8], image_base)
        before = worker_stats(producer, name)
        row = timed_enqueue(producer, listener, model_id, listings[8:], image_base)
        after = worker_stats(producer, name)
    calls_before, calls_after = before.get("model_calls", {}), after.get("model_calls", {})
    calls = calls_after.get("image_calls", 0) - calls_before.get("image_calls", 0)
    images = calls_after.get("images", 0) - calls_before.get("images", 0)
    row["image_calls"] = calls
    row["mean_image_batch"] = round(images / calls, 1) if calls else None
    row["enqueue_group"] = settings.enqueue_group
    row["worker_cpu_ms_per_listing"] = cpu_ms_per_listing(
        before.get("cpu_seconds_by_thread", {}),
        after.get("cpu_seconds_by_thread", {}),
        len(listings) - 8,
    )
    return row


def trickle(
    settings: Settings,
    listener: ResultListener,
    model_id: str,
    listings: Sequence[PeerListing],
    rate: float,
) -> dict[str, Any]:
    """Enqueue-to-commit latency of single listings sent one at a time at `rate` per second."""
    sent: dict[str, float] = {}
    enqueue_ms = []
    with Producer(settings) as producer:
        producer.enqueue([event(listings[0])], model=model_id)  # the producer's first-call work
        listener.wait_for([listings[0].listing_id], timeout=30)
        start = time.perf_counter()
        for i, listing in enumerate(listings[1:]):
            pause = start + i / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            sent[listing.listing_id] = time.perf_counter()
            producer.enqueue([event(listing)], model=model_id)
            enqueue_ms.append((time.perf_counter() - sent[listing.listing_id]) * 1000)
        achieved = len(sent) / (time.perf_counter() - start)
        listener.wait_for(sent, timeout=60)
    latencies = sorted(
        (listener.arrivals[i] - at) * 1000 for i, at in sent.items() if i in listener.arrivals
    )
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    row = {
        "model": model_id,
        "events": len(sent),
        "rate_per_s": rate,
        "achieved_rate_per_s": round(achieved, 1),
        "missing": len(sent) - len(latencies),
        "p50_ms": round(cuts[49], 1),
        "p95_ms": round(cuts[94], 1),
        "p99_ms": round(cuts[98], 1),
        "max_ms": round(latencies[-1], 1),
        "enqueue_call_p50_ms": round(statistics.median(enqueue_ms), 1),
        "latencies_ms": [round(value, 2) for value in latencies],
    }
    print(
        f"  trickle {rate:.0f}/s, {len(sent)} listings: p50 {row['p50_ms']} ms, "
        f"p95 {row['p95_ms']} ms, p99 {row['p99_ms']} ms "
        f"(the enqueue call itself: p50 {row['enqueue_call_p50_ms']} ms)",
        flush=True,
    )
    return row


def settle_disk(settings: Settings) -> None:
    """Write out what the runs before left dirty (PostgreSQL's pages, the drawn images), so a
    latency measurement on an idle worker is not also timing their flush to disk: on the
    development VM a commit's fsync behind such a flush took up to 90 ms."""
    with (
        contextlib.suppress(psycopg.errors.InsufficientPrivilege),
        psycopg.connect(settings.require_database_url(), autocommit=True) as connection,
    ):
        connection.execute("CHECKPOINT")  # a superuser's (or pg_checkpoint's) right
    os.sync()


def print_pipeline(row: dict[str, Any], label: str) -> None:
    cpu = row.get("worker_cpu_ms_per_listing") or {}
    busiest = ", ".join(f"{kind} {ms}" for kind, ms in list(cpu.items())[:5])
    print(
        f"  pipeline {row['model']:16} {label:>14}: {row['listings_per_s']:7.1f} listings/s "
        f"({row['listings']} listings, {row['image_calls']} image calls, "
        f"mean batch {row['mean_image_batch']}; worker CPU ms/listing: {sum(cpu.values()):.2f}"
        f" = {busiest}, ...)",
        flush=True,
    )


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Bench:
    """What every measurement needs: settings, registry, listener, scratch space, a seed."""

    settings: Settings
    registry: Registry
    listener: ResultListener
    images: Path
    plan: Plan
    seed: int = 0

    def listings(self, tag: str, count: int) -> list[PeerListing]:
        self.seed += 1
        return draw_listings(self.images, f"{tag}-{self.seed}", count, self.seed)


@contextlib.contextmanager
def bench_stack(
    scratch: Path, models_file: Path, registry: Registry, plan: Plan
) -> Iterator[Bench]:
    """Embedded PostgreSQL (migrated) and Valkey under `scratch`, and the Bench on them."""
    home = scratch / "home"
    with EmbeddedServers(home) as urls:
        settings = load_settings(
            home=str(home), models_file=str(models_file), file_roots=str(scratch / "images")
        ).with_servers(urls.database_url, urls.broker_url)
        engine = make_engine(settings.require_database_url())
        upgrade(engine)
        engine.dispose()
        listener = ResultListener(settings.require_database_url())
        try:
            yield Bench(settings, registry, listener, scratch / "images", plan)
        finally:
            listener.close()


def run_pipeline(bench: Bench, result: dict[str, Any]) -> None:
    """The headline pipeline run at default settings; right after it, while its worker idles,
    the peer over the same files (so both meet the same load on a shared box) and the trickle;
    then the batch-size sweep, one worker each."""
    plan, settings = bench.plan, bench.settings
    listings = bench.listings("pipe", plan.pipeline_listings + 8)
    trickled = bench.listings("trickle", plan.trickle_events + 1)
    singles = bench.listings("single", plan.pipeline_listings + 8)
    over_http = bench.listings("http", plan.pipeline_listings + 8)
    with pipeline_worker(settings, TOY, "default", LV_ALLOWED_PRIVATE_NETWORKS=LOOPBACK):
        headline = measured_run(settings, bench.listener, TOY, listings)
        headline["batch_max_size"] = settings.batch_max_size
        print_pipeline(headline, f"default ({settings.batch_max_size})")
        # The same over http, from a keep-alive server in its own process: how a catalogue's
        # images arrive (reported beside the file:// headline, not judged).
        with image_server(bench.images) as port:
            base = f"http://localhost:{port}"
            result["pipeline_http"] = measured_run(
                settings, bench.listener, TOY, over_http, image_base=base
            )
        print_pipeline(result["pipeline_http"], "images over http")
        single = measured_run(settings, bench.listener, TOY, singles, group=1)
        single["batch_max_size"] = settings.batch_max_size
        print_pipeline(single, "one per message")
        result["pipeline_single_messages"] = single
        print("peer (plain loop, batch 1, one commit per listing; the worker idles):", flush=True)
        peer_listings = listings[8 : 8 + plan.peer_listings]
        result["peer"] = bench_peer(settings, bench.registry, peer_listings)
        time.sleep(1.0)  # idle: nothing queued, nothing batching
        settle_disk(settings)
        print("latency under a trickle (idle worker):", flush=True)
        result["trickle"] = trickle(settings, bench.listener, TOY, trickled, plan.trickle_rate)
    result["pipeline"] = headline
    print("pipeline at other batch sizes:", flush=True)
    sweep = [headline]
    for size in plan.batch_sweep:
        with pipeline_worker(settings, TOY, f"b{size}", LV_BATCH_MAX_SIZE=str(size)):
            row = measured_run(
                settings, bench.listener, TOY, bench.listings(f"b{size}", len(listings))
            )
        row["batch_max_size"] = size
        print_pipeline(row, f"max batch {size}")
        sweep.append(row)
    result["pipeline_batch_sweep"] = sorted(sweep, key=lambda r: r["batch_max_size"])
    # One message per listing again with a decode process beside the worker, and the images
    # over http with it fetching them too (reported, not judged: the judged rows run at the
    # defaults).
    processes = str(DECODE_PROCESSES)
    with pipeline_worker(settings, TOY, "pool", LV_DECODE_PROCESSES=processes):
        pooled = measured_run(
            settings, bench.listener, TOY, bench.listings("pool", len(singles)), group=1
        )
    pooled["decode_processes"] = DECODE_PROCESSES
    print_pipeline(pooled, f"{DECODE_PROCESSES} decode proc.")
    with (
        pipeline_worker(
            settings,
            TOY,
            "pool-http",
            LV_DECODE_PROCESSES=processes,
            LV_POOL_FETCHES="true",
            LV_ALLOWED_PRIVATE_NETWORKS=LOOPBACK,
        ),
        image_server(bench.images) as port,
    ):
        pooled_http = measured_run(
            settings,
            bench.listener,
            TOY,
            bench.listings("pool-http", len(over_http)),
            image_base=f"http://localhost:{port}",
        )
    pooled_http.update(decode_processes=DECODE_PROCESSES, pool_fetches=True)
    print_pipeline(pooled_http, f"over http, {DECODE_PROCESSES} fetch+decode proc.")
    result["pipeline_single_messages_decode_processes"] = pooled
    result["pipeline_http_decode_processes"] = pooled_http


def run_profile(bench: Bench, out: Path) -> dict[str, Any]:
    """An extra headline-shaped run with py-spy attached (its rate is not used for ratios)."""
    settings = bench.settings
    listings = bench.listings("prof", bench.plan.pipeline_listings + 8)
    with pipeline_worker(settings, TOY, "profiled") as child:
        assert child.process is not None
        with flame_graph(child.process.pid, out, settings.home / "py-spy.log") as report:
            row = measured_run(settings, bench.listener, TOY, listings)
    print_pipeline(row, "under py-spy")
    print(f"  flame graph: {report.get('flame_graph') or report.get('error')}", flush=True)
    return {**report, "pipeline_under_profiler": row}


# A simulated accelerator stands for a GPU host, so its workers take that host's input path
# (resize and crop batched one batch ahead, the normalise pass on the device); Pillow still
# decodes on the CPU. The first model is measured once more on the PIL path, for comparison.
SIM_INPUT_PATH = "tensor"


def measure_alone(bench: Bench, model_id: str, batch: int) -> dict[str, float]:
    """A model alone at `batch`, as every pipeline row is judged against: images/s, and
    listings/s on the pipeline's own workload (`model_only_listings`)."""
    seconds = bench.plan.sim_seconds
    images = bench_model(bench.registry, model_id, [batch], seconds)[0]["images_per_s"]
    listings = model_only_listings(bench.registry, model_id, batch, seconds)
    return {"images_per_s": images, "listings_per_s": listings}


def against_alone(row: dict[str, Any], alone: dict[str, float]) -> dict[str, Any]:
    """A pipeline row's figures beside the model alone: its rates and the row's ratios to them
    (the whole run's, and the steady one's when the row has it)."""
    model_only = alone["listings_per_s"]
    steady = row.get("steady_listings_per_s")
    return {
        "model_only_images_per_s": alone["images_per_s"],
        "model_only_listings_per_s": round(model_only, 1),
        "ratio_to_model_only": round(row["listings_per_s"] / model_only, 3),
        "steady_ratio_to_model_only": round(steady / model_only, 3) if steady else None,
    }


def run_simulated(bench: Bench) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each simulated model: its images/s alone, then listings/s through a real worker on the
    tensor input path; and the first model's pipeline on the PIL path."""
    rows: list[dict[str, Any]] = []
    pil_row: dict[str, Any] = {}
    for index, (model_id, (name, batch)) in enumerate(SIM_MODELS.items()):
        alone = measure_alone(bench, model_id, batch)
        bound = simulated_bound(name, batch)
        paths = (SIM_INPUT_PATH, "pil") if index == 0 else (SIM_INPUT_PATH,)
        count = batch * -(-bench.plan.sim_listings // batch)  # whole batches
        for path in paths:
            listings = bench.listings(model_id, count + 8)
            with pipeline_worker(bench.settings, model_id, f"sim-{path}", LV_INPUT_PATH=path):
                row = measured_run(bench.settings, bench.listener, model_id, listings)
            row.update(
                simulated=name,
                input_path=path,
                batch_max_size=batch,
                **against_alone(row, alone),
                device_bound_listings_per_s=round(bound, 1),
                ratio_to_device_bound=round(row["listings_per_s"] / bound, 3),
            )
            print_pipeline(row, f"sim batch {batch}, {path} input path")
            print(
                f"    ratio to model alone {row['ratio_to_model_only']:.3f} "
                f"(steady: {row['steady_ratio_to_model_only']}), "
                f"to image+text device bound {row['ratio_to_device_bound']:.3f}",
                flush=True,
            )
            if path == SIM_INPUT_PATH:
                rows.append(row)
            else:
                pil_row = row
    return rows, pil_row


def run_baselines_and_pipelines(bench: Bench, result: dict[str, Any]) -> None:
    """Parts 2 to 6: the no-op drain, the lv-toy pipeline (with the peer and the trickle) and
    the simulated accelerators."""
    print("no-op Celery drain (same worker shape, task does nothing):", flush=True)
    result["noop_drain"] = bench_noop_drain(bench.settings, bench.plan.noop_messages)
    print("pipeline (embedded PostgreSQL and Valkey, one worker process):", flush=True)
    run_pipeline(bench, result)
    print("simulated accelerator:", flush=True)
    result["simulated"], result["simulated_pil_path"] = run_simulated(bench)


def run_device_models(
    bench: Bench,
    model_ids: Sequence[str],
    measured: Callable[[list[dict[str, Any]]], None] = lambda _rows: None,
) -> list[dict[str, Any]]:
    """Each real model (bench/device_models.py): its images/s and listings/s alone, then
    listings/s through a real worker at the settings' defaults (on a CUDA host: nvJPEG decode,
    the tensor input path). A quick plan sends one batch each. `measured(rows so far)` after
    each model: a short GPU lease keeps what it measured if it runs out."""
    rows: list[dict[str, Any]] = []
    for model_id in model_ids:
        model = DEVICE_MODELS[model_id]
        try:
            alone = measure_alone(bench, model_id, model.batch)
            count = model.batch if bench.plan is QUICK else model.listings
            listings = bench.listings(model_id, count + 8)
            with pipeline_worker(bench.settings, model_id, "device"):
                row = measured_run(bench.settings, bench.listener, model_id, listings)
        except Exception as error:  # one model's failure: recorded, and the others still run
            print(f"  {model_id} failed: {type(error).__name__}: {error}", flush=True)
            rows.append({"model": model_id, "error": f"{type(error).__name__}: {error}"})
            measured(rows)
            continue
        row.update(model_name=model.name, batch_max_size=model.batch, **against_alone(row, alone))
        print_pipeline(row, f"batch {model.batch}")
        print(f"    ratio to model alone {row['ratio_to_model_only']:.3f}", flush=True)
        rows.append(row)
        measured(rows)
    return rows


def checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each ratio with its target (if any) and whether it is met (of the parts that ran)."""
    values: dict[str, float] = {}
    if "pipeline" in result:
        headline = result["pipeline"]["listings_per_s"]
        # The no-op drain is of one-job messages: against it, the pipeline fed the same shape.
        single = result["pipeline_single_messages"]["listings_per_s"]
        noop = result["noop_drain"]
        values = {
            "pipeline_vs_noop_drain": single / noop["messages_per_s"],
            "pipeline_vs_noop_worker_drain": single / noop["worker_drain_per_s"],
            "pipeline_vs_peer": headline / result["peer"]["listings_per_s"],
            "pipeline_grouped_vs_noop_drain": headline / noop["messages_per_s"],
            "pipeline_decode_processes_vs_noop_drain": result[
                "pipeline_single_messages_decode_processes"
            ]["listings_per_s"]
            / noop["messages_per_s"],
            "trickle_p95_ms": result["trickle"]["p95_ms"],
        }
        for name in ("pipeline_http", "pipeline_http_decode_processes"):
            if name in result:
                values[f"{name}_vs_file"] = result[name]["listings_per_s"] / headline
    for row in result.get("simulated", []):
        values[f"{row['model'].replace('-', '_')}_vs_model"] = row["ratio_to_model_only"]
        if row.get("steady_ratio_to_model_only"):  # reported beside it, never judged
            steady = row["steady_ratio_to_model_only"]
            values[f"{row['model'].replace('-', '_')}_steady_vs_model"] = steady
    targets: dict[str, tuple[str | None, float | None]] = dict(TARGETS)
    for name, (value, judged_by, bound) in device_checks(result.get("device_models", [])).items():
        values[name] = value
        targets[name] = (judged_by, bound)
    rows = []
    for name, value in values.items():
        op, target = targets.get(name, (None, None))
        met = None if target is None else (value >= target if op == ">=" else value <= target)
        rows.append(
            {"name": name, "value": round(value, 3), "op": op, "target": target, "met": met}
        )
    return rows


def machine() -> dict[str, Any]:
    return {
        "cpu_cores": psutil.cpu_count(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def print_summary(result: dict[str, Any]) -> None:
    load = result["load_average_1m"]
    print(
        "\nsummary (ratios against baselines measured in this run; load average "
        f"{load['start']:.1f} at the start, {load['end']:.1f} at the end, "
        f"on {result['cpu_cores']} cores):"
    )
    print(f"  {'':34} {'value':>10} {'target':>10}  met")
    if "pipeline" in result:
        noop = result["noop_drain"]
        print(f"  {'no-op send and drain (messages/s)':34} {noop['messages_per_s']:>10}")
        print(f"  {'no-op drain of a full queue (msg/s)':34} {noop['worker_drain_per_s']:>10}")
        print(f"  {'peer (listings/s)':34} {result['peer']['listings_per_s']:>10}")
        headline = result["pipeline"]["listings_per_s"]
        print(f"  {'pipeline, default (listings/s)':34} {headline:>10}")
        if "pipeline_http" in result:
            over_http = result["pipeline_http"]["listings_per_s"]
            print(f"  {'pipeline, images over http':34} {over_http:>10}")
        single = result["pipeline_single_messages"]["listings_per_s"]
        print(f"  {'pipeline, one per message':34} {single:>10}")
    for row in result.get("device_models", []):
        label = f"{row['model']} (listings/s)"
        print(f"  {label:34} {row.get('listings_per_s', row.get('error')):>10}")
    for row in result["checks"]:
        target = f"{row['op']} {row['target']}" if row["target"] is not None else ""
        met = {True: "yes", False: "NO", None: ""}[row["met"]]
        print(f"  {row['name']:34} {row['value']:>10} {target:>10}  {met}")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="enough of each measurement to see it work"
    )
    parser.add_argument(
        "--profile", action="store_true", help="add a py-spy flame graph of the worker"
    )
    parser.add_argument(
        "--device-models",
        nargs="*",
        choices=sorted(DEVICE_MODELS),
        metavar="ID",
        help="real models to measure (bench/device_models.py); default: all of them on a CUDA "
        "host, none on a CPU",
    )
    parser.add_argument(
        "--device-only",
        action="store_true",
        help="only the real models (a GPU host's short first look; writes <date>-<device>-"
        "models.json)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="where the JSON and the plot go (default bench/results; a GPU lease: $OUT)",
    )
    args = parser.parse_args()
    quick, profile = args.quick, args.profile
    device_ids = args.device_models
    if device_ids is None:
        device_ids = sorted(DEVICE_MODELS) if torch.cuda.is_available() else []
    if args.device_only and not device_ids:
        parser.error("--device-only measures real models: it needs CUDA or --device-models ID")
    plan = QUICK if quick else FULL
    device = device_label()
    today = date.today().isoformat()
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    stem = f"{today}-{slug}{'-quick' if quick else ''}{'-models' if args.device_only else ''}"
    result: dict[str, Any] = {"date": today, "device": device, "quick": quick, **machine()}
    load_at_start = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{stem}.json"

    def save_partial(rows: list[dict[str, Any]]) -> None:
        partial = {**result, "device_models": rows, "partial": True}
        out.write_text(json.dumps(partial, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        models_file = scratch / "models.toml"
        models_file.write_text(REGISTRY + registry_text(scratch, device_ids))
        registry = load_registry(models_file)
        if not args.device_only:
            batches = plan.model_batches if device.startswith("cpu") else (1, 32, 128, 256)
            print("model alone:", flush=True)
            result["model"] = [
                row
                for m in plan.model_ids
                for row in bench_model(registry, m, batches, plan.model_seconds)
            ]
        with bench_stack(scratch, models_file, registry, plan) as bench:
            if not args.device_only:
                run_baselines_and_pipelines(bench, result)
            if device_ids:
                print("real models on the device:", flush=True)
                result["device_models"] = run_device_models(bench, device_ids, save_partial)
            if profile:
                print("profile (py-spy on the worker):", flush=True)
                flame = args.out / f"{stem}-worker-flame.svg"
                result["profile"] = run_profile(bench, flame)
    # Other work on the machine slows some measurements more than others: this says how busy
    # it was (1-minute load average against the cores), to judge a surprising ratio by.
    result["load_average_1m"] = {"start": load_at_start, "end": os.getloadavg()[0]}
    result["checks"] = checks(result)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result)
    print(f"wrote {out}")
    if not args.device_only:
        print(f"wrote {plot_throughput(result, out.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
