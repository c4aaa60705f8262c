"""`listing-vision up` on a bare LV_HOME: embedded servers, a worker, Flower; Ctrl-C stops all."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests import images
from tests.integration.conftest import free_port

pytestmark = pytest.mark.slow


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def _wait_until(predicate, timeout: float, what: str, log: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{what} not within {timeout}s:\n{log.read_text(errors='replace')[-4000:]}")


def _worker_models(pid: int) -> set[str]:
    """The models of `up`'s worker children (their --model argument)."""
    models = set()
    for child in psutil.Process(pid).children(recursive=True):
        try:
            argv = child.cmdline()
        except psutil.Error:  # exited (a retired worker not reaped yet)
            continue
        if "worker" in argv and "--model" in argv:
            models.add(argv[argv.index("--model") + 1])
    return models


def test_up_runs_the_stack_and_ctrl_c_stops_every_child(tmp_path: Path, models_file: Path) -> None:
    home, roots = tmp_path / "home", tmp_path / "images"
    roots.mkdir()
    image = images.save(images.product_image("red"), roots / "red.jpg")
    port, exporter_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LV_")}
    env.update(
        LV_HOME=str(home),
        LV_MODELS_FILE=str(models_file),
        LV_MODEL="tiny",
        LV_FILE_ROOTS=str(roots),
        LV_FLOWER_PORT=str(port),
        LV_FLOWER_USER="ops",
        LV_FLOWER_PASSWORD="s3cret",
        LV_EXPORTER_PORT=str(exporter_port),
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "up.log"
    with open(log, "wb") as output:
        up = subprocess.Popen(
            [sys.executable, "-m", "listing_vision", "up"], env=env, stdout=output, stderr=output
        )
    try:
        logs = home / "logs"
        worker_log = logs / "worker-tiny.log"
        _wait_until(lambda: "ready." in worker_log.read_text(), 120, "worker ready", log)
        flower = f"http://127.0.0.1:{port}/"
        _wait_until(lambda: _get(flower, ("ops", "s3cret")) == 200, 60, "Flower", log)
        assert _get(flower) == 401
        assert _get(f"http://127.0.0.1:{port}/api/workers") == 401
        assert _get(f"http://127.0.0.1:{port}/metrics") == 401  # Flower's own, guarded too
        assert _get(f"http://127.0.0.1:{port}/metrics", ("ops", "s3cret")) == 200
        # The one exporter runs with the stack: the active model's queue, both sources read.
        exporter = f"http://127.0.0.1:{exporter_port}/metrics"
        _wait_until(lambda: _get(exporter) == 200, 60, "exporter", log)
        with urllib.request.urlopen(exporter, timeout=10) as answer:
            scraped = answer.read().decode()
        assert 'lv_queue_messages{model="tiny",queue="lv.tiny"}' in scraped
        assert 'lv_exporter_source_up{source="broker"} 1.0' in scraped

        event = {"listing_id": "up-1", "title": "red thing", "image_url": image.as_uri()}
        enqueue = subprocess.run(
            [sys.executable, "-m", "listing_vision", "enqueue", "-", "--wait", "--timeout", "120"],
            input=json.dumps(event),
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert enqueue.returncode == 0, enqueue.stderr
        results = subprocess.run(
            [sys.executable, "-m", "listing_vision", "results", "--format", "jsonl"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        rows = [json.loads(line) for line in results.stdout.splitlines()]
        assert [(r["listing_id"], r["status"]) for r in rows] == [("up-1", "ok")]
        reindex = subprocess.run(
            [
                sys.executable,
                "-m",
                "listing_vision",
                "reindex",
                "--model",
                "tiny-batch",
                "--follow",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )  # up starts a worker for tiny-batch, which backfills it; then the switch
        assert reindex.returncode == 0, reindex.stdout + reindex.stderr
        assert "succeeded" in reindex.stdout
        switched = subprocess.run(
            [sys.executable, "-m", "listing_vision", "results", "--format", "jsonl"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        rows = [json.loads(line) for line in switched.stdout.splitlines()]
        assert [(r["listing_id"], r["model_id"]) for r in rows] == [("up-1", "tiny-batch")]
        _wait_until(lambda: _worker_models(up.pid) == {"tiny-batch"}, 120, "fleet converged", log)
        children = [
            c
            for c in psutil.Process(up.pid).children(recursive=True)
            if c.status() != psutil.STATUS_ZOMBIE  # a retired worker not reaped yet
        ]
        names = [" ".join(c.cmdline()) for c in children]
        assert len(children) >= 4, names  # worker, beat, Flower and the exporter
        assert any("listing_vision beat" in name for name in names), names
        assert any("listing_vision exporter" in name for name in names), names
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=90)
    assert code == 0, log.read_text(errors="replace")[-3000:]
    # One log directory for everything up ran; the console is up's own (copied to up.log).
    written = {path.name: path.read_text(errors="replace") for path in logs.glob("*.log")}
    assert {"up.log", "beat.log", "flower.log", "exporter.log"} <= set(written), set(written)
    assert {"worker-tiny.log", "worker-tiny-batch.log"} <= set(written), set(written)
    assert "listing-vision is up" in written["up.log"]
    assert "started worker-tiny" in written["up.log"]
    assert "exporter on http://127.0.0.1" in written["exporter.log"]
    assert "listing_id=up-1" in written["worker-tiny.log"]
    assert "listing_id=up-1" not in log.read_text(errors="replace")
    assert all(written[name] for name in ("beat.log", "flower.log")), written
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    state = json.loads((home / "embedded.json").read_text())
    assert state["handles"] == [] and "valkey" not in state
    servers = [
        p.info
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "postgres" and str(home) in " ".join(p.info["cmdline"] or [])
    ]
    assert servers == []
