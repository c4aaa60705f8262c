"""`listing-vision up`: the worker(s) and Flower as child processes, supervised in the foreground.

Children run in their own sessions so that Ctrl-C reaches only this process, which then stops
them in order (workers first, with a warm shutdown that finishes or returns their jobs), and
only then the servers. A worker that dies is started again, unless it keeps dying at start.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from contract.settings import Settings

log = logging.getLogger(__name__)
# What `up` prints for people (the banner) is copied to `up.log` through this logger, which
# reaches only the handlers `up` gives it, never the console a second time.
console_copy = logging.getLogger("listing_vision.console")
console_copy.propagate = False
console_copy.setLevel(logging.INFO)
RESTART_LIMIT = 5  # deaths within RESTART_WINDOW before giving up
RESTART_WINDOW = 300.0
# Longer than a worker's soft shutdown (at most 60 s, contract/broker.py) plus its requeueing.
WORKER_STOP_TIMEOUT = 90.0
FLEET_EVERY = 5.0  # seconds between looks at which workers the runs need
_PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    """One supervised process: how to start it, and whether to start it again when it dies."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path | None = None
    restart: bool = True
    # An inessential child (the exporter) that keeps exiting is left stopped, and the stack
    # runs on: metrics must never take the processing down.
    essential: bool = True
    process: subprocess.Popen[bytes] | None = None
    deaths: list[float] = field(default_factory=list)

    def start(self) -> None:
        """Start (or restart) the process; its output goes to `log_path` or to ours."""
        output = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            if output is not None:
                output.close()  # the child has its own copy
        log.info("started %s (pid %d)", self.name, self.process.pid)


def _die_with_parent() -> None:
    """Linux: if `up` is killed outright, its children get SIGTERM instead of running on."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_env(resolved: Settings, **extra: str) -> dict[str, str]:
    """The environment of a child: the resolved server URLs, so it never starts its own."""
    env = dict(os.environ)
    env["LV_DATABASE_URL"] = resolved.require_database_url()
    env["LV_BROKER_URL"] = resolved.require_broker_url()
    env.update(extra)
    return env


def worker_env(resolved: Settings) -> dict[str, str]:
    """A worker's environment under `up`: as any child's, and its metrics (with
    LV_METRICS_PORT) on 127.0.0.1 unless LV_METRICS_HOST says otherwise, as SPEC.md has the
    embedded default serve them."""
    env = child_env(resolved)
    if not env.get("LV_METRICS_HOST"):
        env["LV_METRICS_HOST"] = "127.0.0.1"
    return env


def log_dir(settings: Settings) -> Path:
    """The one directory for the logs of everything `up` runs: `LV_HOME/logs`."""
    logs = settings.home.expanduser() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs


def flower_child(resolved: Settings) -> Child:
    """Flower on 127.0.0.1 (`listing-vision flower`); with LV_FLOWER_USER/PASSWORD set it also
    asks for them. Secrets (the broker password, the Flower password) travel in the
    environment, never in `ps`."""
    argv = [sys.executable, "-m", "listing_vision", "flower", "--address=127.0.0.1"]
    argv.append(f"--port={resolved.flower_port}")
    return Child("flower", argv, child_env(resolved), log_dir(resolved) / "flower.log")


def exporter_child(resolved: Settings) -> Child:
    """The deployment's exporter (queue depth, backlog, runs) on 127.0.0.1:LV_EXPORTER_PORT."""
    argv = [sys.executable, "-m", "listing_vision", "exporter", "--host=127.0.0.1"]
    logs = log_dir(resolved) / "exporter.log"
    return Child("exporter", argv, child_env(resolved), logs, essential=False)


def beat_child(resolved: Settings) -> Child:
    """Celery beat (scheduled rescoring, the watch over runs), with its control worker."""
    argv = [sys.executable, "-m", "listing_vision", "beat"]
    return Child("beat", argv, child_env(resolved), log_dir(resolved) / "beat.log")


class Fleet(Protocol):
    """Workers that come and go while the stack runs (`listing_vision.fleet.WorkerFleet`)."""

    def converge(self) -> None: ...
    def planned(self) -> list[Child]: ...
    def all(self) -> list[Child]: ...


def worker_stop_timeout(settings: Settings) -> float:
    """How long a stopping worker may take: its warm shutdown waits for the jobs it runs, and
    an attempt may take the model's time limit plus a fetch and a write. Killed sooner, those
    jobs would wait a whole visibility timeout for their redelivery."""
    return max(WORKER_STOP_TIMEOUT, settings.task_time_limit + settings.fetch_timeout + 60.0)


def supervise(
    children: list[Child],
    fleet: Fleet | None = None,
    banner: str = "",
    worker_timeout: float = WORKER_STOP_TIMEOUT,
) -> int:
    """Run `children` (and the fleet's workers) until a signal (0) or until one keeps
    crashing (1). Workers stop first (each given `worker_timeout` for its warm shutdown), then
    `children` in the order given (beat before Flower), so jobs finish or return before
    anything they report to goes away."""
    stopping = _StopFlag()
    for child in children:
        child.start()
    if fleet is not None:
        fleet.converge()
    if banner:
        print(banner, flush=True)
        console_copy.info("%s", banner)
    status = 0
    next_converge = time.monotonic() + FLEET_EVERY
    try:
        while not stopping.set:
            if fleet is not None and time.monotonic() >= next_converge:
                fleet.converge()
                next_converge = time.monotonic() + FLEET_EVERY
            workers = fleet.planned() if fleet is not None else []
            failed = _restart_dead([*workers, *children])
            if failed:
                log.error("%s keeps exiting; stopping the stack%s", failed.name, _tail(failed))
                status = 1
                break
            time.sleep(0.5)
    finally:
        if fleet is not None:
            stop_children(fleet.all(), timeout=worker_timeout)
        for child in children:  # in order, each given its warm shutdown
            stop_children([child], timeout=WORKER_STOP_TIMEOUT)
        stopping.restore()
    return status


def _restart_dead(children: list[Child]) -> Child | None:
    now = time.monotonic()
    for child in children:
        if child.process is None or child.process.poll() is None:
            continue
        code = child.process.returncode
        child.deaths = [t for t in child.deaths if now - t < RESTART_WINDOW] + [now]
        log.warning("%s exited with status %s", child.name, code)
        if not child.restart or len(child.deaths) >= RESTART_LIMIT:
            if child.essential:
                return child
            log.error(
                "%s keeps exiting; left stopped, the stack runs on%s", child.name, _tail(child)
            )
            child.process = None
            continue
        time.sleep(min(10.0, 0.5 * 2 ** len(child.deaths)))
        child.start()
    return None


def _tail(child: Child, lines: int = 15) -> str:
    """The last lines of a child's log, to show why it keeps exiting without a search."""
    if child.log_path is None or not child.log_path.exists():
        return ""
    with open(child.log_path, "rb") as log_file:
        log_file.seek(max(0, log_file.seek(0, os.SEEK_END) - 8192))
        text = log_file.read().decode(errors="replace")
    last = "\n".join(text.splitlines()[-lines:])
    return f"; the end of {child.log_path}:\n{last}"


def stop_children(children: list[Child], timeout: float) -> None:
    """SIGTERM everyone (Celery's warm shutdown), wait, then SIGKILL what is left."""
    running = [c.process for c in children if c.process and c.process.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _StopFlag:
    """Turns the first SIGINT/SIGTERM into a flag; the supervisor loop then stops cleanly."""

    def __init__(self) -> None:
        self.set = False
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
        }

    def _handle(self, signum: int, _frame: object) -> None:
        if not self.set:
            print("\nstopping: waiting for workers to finish their jobs...", flush=True)
        self.set = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as `--gpu` values: CUDA_VISIBLE_DEVICES when set (a
    subset, or none when empty), else every GPU nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    try:
        output = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = [line for line in output.splitlines() if line.startswith("GPU ")]
    return [str(index) for index in range(len(gpus))]


def banner(settings: Settings, model_id: str) -> str:
    """What `up` prints once its children started."""
    auth = "with basic auth" if settings.flower_user else "no auth: loopback only"
    return (
        f"listing-vision is up: model {model_id} (workers follow runs and reindexes); Flower on "
        f"http://127.0.0.1:{settings.flower_port} ({auth}); metrics on "
        f"http://127.0.0.1:{settings.exporter_port}/metrics; logs in {log_dir(settings)}. "
        "Ctrl-C stops everything."
    )
