"""Real servers and real worker processes, started once per test session."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from contract.settings import Settings, load_settings
from db.engine import make_engine, make_sessions
from db.migrate import upgrade
from listing_vision.embedded import EmbeddedServers, ServerUrls
from producer.enqueue import Producer
from tests.tiny_models import save_tiny_open_clip

pytestmark = pytest.mark.slow
T = TypeVar("T")


@dataclass(frozen=True)
class Stack:
    home: Path
    urls: ServerUrls
    engine: Engine

    @property
    def database_url(self) -> str:
        assert self.urls.database_url
        return self.urls.database_url

    @property
    def broker_url(self) -> str:
        assert self.urls.broker_url
        return self.urls.broker_url


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("lv-home")
    with EmbeddedServers(home) as urls:
        assert urls.database_url
        engine = make_engine(urls.database_url)
        upgrade(engine)
        yield Stack(home, urls, engine)
        engine.dispose()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_open_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def models_file(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("registry") / "models.toml"
    path.write_text(
        f"""
[models.tiny]
backend = "open_clip"
name = "local-dir:{model_dir}"
threshold = 0.1

[models.tiny-batch]
backend = "open_clip"
name = "local-dir:{model_dir}"
threshold = 0.1
batch_max_size = 32
batch_max_wait_ms = 500
"""
    )
    return path


@pytest.fixture(scope="session")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture(scope="session")
def image_server(image_root: Path) -> Iterator[str]:
    """Serves `image_root` on 127.0.0.1; yields its base URL."""

    def handler(*args, **kwargs):  # type: ignore[no-untyped-def]
        return _QuietHandler(*args, directory=str(image_root), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def lv_environment(
    stack: Stack, models_file: Path, image_root: Path, **extra: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LV_")}
    env.update(
        LV_HOME=str(stack.home),
        LV_DATABASE_URL=stack.database_url,
        LV_BROKER_URL=stack.broker_url,
        LV_MODELS_FILE=str(models_file),
        LV_MODEL="tiny",
        LV_FILE_ROOTS=str(image_root),
        LV_ALLOWED_PRIVATE_NETWORKS="127.0.0.0/8",
        LV_MAX_IMAGE_BYTES="300000",
        LV_FETCH_TIMEOUT="5",
        LV_RETRY_BACKOFF="0.2",
        LV_BATCH_MAX_WAIT_MS="50",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def settings_from(env: dict[str, str]) -> Settings:
    """The settings a process started with `env` would read (init values beat the shell's)."""
    values = {k.removeprefix("LV_").lower(): v for k, v in env.items() if k.startswith("LV_")}
    return load_settings(**values)


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def spawn_worker(env: dict[str, str], log_path: Path, model: str = "tiny") -> WorkerProcess:
    """`listing-vision worker` as a real subprocess, not waited for (see `wait_ready`)."""
    output = open(log_path, "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "listing_vision", "worker", "--model", model],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    return WorkerProcess(process, log_path, env)


def wait_ready(worker: WorkerProcess, timeout: float = 120) -> WorkerProcess:
    """Returns once the worker's model is loaded and it consumes its queue."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.process.poll() is not None:
            code = worker.process.returncode
            pytest.fail(f"worker exited with {code}:\n{worker.log()[-4000:]}")
        if "ready." in worker.log():
            return worker
        time.sleep(0.2)
    worker.process.kill()
    pytest.fail(f"worker not ready within {timeout}s:\n{worker.log()[-4000:]}")


def start_worker(
    stack: Stack, env: dict[str, str], log_path: Path, model: str = "tiny", timeout: float = 120
) -> WorkerProcess:
    """`listing-vision worker` as a real subprocess; returns once its model is loaded."""
    return wait_ready(spawn_worker(env, log_path, model), timeout)


def start_workers(
    wanted: Sequence[tuple[dict[str, str], Path, str]], timeout: float = 120
) -> list[WorkerProcess]:
    """Several workers (env, log, model each), started together: their start-ups (imports, model
    loads) overlap instead of queueing. Returns once all are ready."""
    workers = [spawn_worker(env, log_path, model) for env, log_path, model in wanted]
    try:
        return [wait_ready(worker, timeout) for worker in workers]
    except BaseException:  # pytest.fail too: none is left running
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
        raise


def stop_worker(worker: WorkerProcess) -> None:
    stop_workers([worker])


@contextlib.contextmanager
def running_workers(
    env: dict[str, str], logs: Path, *models: str, **extra: str
) -> Iterator[list[WorkerProcess]]:
    """One worker per model (`env` plus `extra`), started together and stopped together."""
    wanted = [
        ({**env, **extra}, logs / f"worker-{m}-{uuid.uuid4().hex[:6]}.log", m) for m in models
    ]
    processes = start_workers(wanted)
    try:
        yield processes
    finally:
        stop_workers(processes)


def stop_workers(workers: Sequence[WorkerProcess]) -> None:
    """SIGTERM (a warm shutdown) to all at once, then wait for each; SIGKILL after 60 s."""
    for worker in workers:
        worker.process.terminate()
    for worker in workers:
        try:
            worker.process.wait(60)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()


@pytest.fixture(scope="session")
def worker_env(stack: Stack, models_file: Path, image_root: Path) -> dict[str, str]:
    return lv_environment(stack, models_file, image_root)


@pytest.fixture(scope="session")
def worker(
    stack: Stack, worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    log_path = tmp_path_factory.mktemp("logs") / "worker.log"
    process = start_worker(stack, worker_env, log_path)
    yield process
    stop_worker(process)


@pytest.fixture(scope="session")
def producer(stack: Stack, worker_env: dict[str, str]) -> Iterator[Producer]:
    settings = settings_from(worker_env)
    with Producer(settings) as instance:
        yield instance


def together(*calls: Callable[[], T]) -> list[T]:
    """The calls' results, the calls made at once (independent commands, each a process of its
    own: their start-ups overlap instead of queueing)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


def query(stack: Stack, sql: str, **params: object) -> list[dict]:  # type: ignore[type-arg]
    with make_sessions(stack.engine)() as session:
        return [dict(row) for row in session.execute(text(sql), params).mappings()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sessions_with_model(stack: Stack, model_id: str) -> sessionmaker[Session]:
    """A session factory on the stack, with `model_id` registered (jobs need their model)."""
    from contract.registry import ModelSpec
    from db import registered_models
    from db.engine import make_sessions

    factory = make_sessions(stack.engine)
    with factory.begin() as session:
        registered_models.ensure_model(
            session, ModelSpec(model_id, "open_clip", "x", threshold=0.5)
        )
    return factory


@dataclass(frozen=True)
class OwnServers:
    """A database of its own (migrated) and a broker database of its own (emptied), on the
    session's servers: for a module whose workers must not see other modules' jobs."""

    database_url: str
    broker_url: str
    engine: Engine


def own_servers(stack: Stack, prefix: str, broker_db: int) -> OwnServers:
    import uuid

    import redis
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with stack.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    database_url = make_url(stack.database_url).set(database=name).render_as_string(False)
    broker_url = stack.broker_url.rsplit("/", 1)[0] + f"/{broker_db}"
    redis.Redis.from_url(broker_url).flushdb()
    engine = make_engine(database_url)
    upgrade(engine)
    return OwnServers(database_url, broker_url, engine)


def wait_for_index(engine: Engine, model_id: str, timeout: float = 60) -> None:
    """A worker builds its model's HNSW index in the background: wait until it is valid."""
    from db.embedding_index import index_state

    deadline = time.monotonic() + timeout
    while True:
        with make_sessions(engine)() as session:
            if index_state(session, model_id) == "valid":
                return
        if time.monotonic() > deadline:
            pytest.fail(f"the HNSW index of {model_id} was not built within {timeout:.0f} s")
        time.sleep(0.1)
