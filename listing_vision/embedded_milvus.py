"""milvus-lite for `LV_MILVUS_URI=<path>`: one server process per data directory, shared.

milvus-lite keeps its data in a directory that only one process may open (it takes a lock), and
listing-vision has many processes (workers, `up`, commands). So, as with the embedded
PostgreSQL and Valkey, the first process that needs it starts `milvus-lite server` over the
directory on a free loopback port, later ones reuse it, and the last one to leave stops it;
each talks to it as to a Milvus server (`http://127.0.0.1:port`). The server runs one request
at a time (milvus-lite does not guard concurrent writes to a collection).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import psutil

from listing_vision.embedded import (
    EmbeddedError,
    _free_port,
    _identity,
    _is_same_process,
    _live,
    _read_json,
    _write_private,
)

START_TIMEOUT = 60.0  # seconds: importing milvus-lite and opening its data takes a few


class EmbeddedMilvus:
    """Start (or reuse) the milvus-lite server of one data directory; stop it when done."""

    _local_users: ClassVar[dict[Path, int]] = {}

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        stem = self.data_dir.name
        self._state_path = self.data_dir.with_name(f".{stem}.lv-server.json")
        self._lock_path = self.data_dir.with_name(f".{stem}.lv-server.lock")
        self.log_path = self.data_dir.with_name(f".{stem}.lv-server.log")
        self._registered = False

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> str:
        """The server's URL, starting it if nobody runs it; registers this process as a user."""
        try:
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise EmbeddedError(f"milvus-lite at {self.data_dir}: {error}") from error
        with self._locked() as state:
            known = state.get("server", {})
            if not (known and _alive(known)):
                known = self._start_server()
                state["server"] = known
            state["handles"] = [*_live(state.get("handles", [])), _identity(os.getpid())]
        self._registered = True
        self._local_users[self.data_dir] = self._local_users.get(self.data_dir, 0) + 1
        return str(known["url"])

    def stop(self) -> None:
        """Unregister this process; the last live user stops the server."""
        if not self._registered:
            return
        self._registered = False
        self._local_users[self.data_dir] -= 1
        if self._local_users[self.data_dir] > 0:
            return
        with self._locked() as state:
            others = [h for h in _live(state.get("handles", [])) if h[0] != os.getpid()]
            state["handles"] = others
            if not others:
                _stop_server(state.pop("server", None))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        with open(self._lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = _read_json(self._state_path)
            yield state
            tmp = self._state_path.with_suffix(".tmp")
            _write_private(tmp, json.dumps(state, indent=2))
            tmp.replace(self._state_path)

    def _start_server(self) -> dict[str, Any]:
        if importlib.util.find_spec("milvus_lite") is None:
            raise EmbeddedError(
                "milvus-lite is not installed: pip install 'listing-vision[milvus-lite]'"
            )
        # The free port is chosen here and bound by the child: another process may take it in
        # between (then the child exits at once), so a few ports are tried.
        for attempt in range(3):
            try:
                return self._start_on(_free_port())
            except _PortTaken:
                if attempt == 2:
                    raise EmbeddedError(f"milvus-lite at {self.data_dir}: no port") from None
        raise AssertionError("unreachable")

    def _start_on(self, port: int) -> dict[str, Any]:
        argv = [sys.executable, "-m", __name__, str(self.data_dir), str(port)]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            # Own session: Ctrl-C in the terminal must not stop it before the workers.
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                with open(self.log_path, "rb") as log:
                    log.seek(offset)
                    tail = log.read().decode(errors="replace")[-1500:]
                if "bind" in tail.lower():
                    raise _PortTaken
                raise EmbeddedError(f"milvus-lite at {self.data_dir} exited at start:\n{tail}")
            if _answers(port):
                return {
                    "pid": process.pid,
                    "started": psutil.Process(process.pid).create_time(),
                    "port": port,
                    "url": f"http://127.0.0.1:{port}",
                }
            time.sleep(0.1)
        process.kill()
        raise EmbeddedError(f"milvus-lite at {self.data_dir} did not answer within 60 s")


class _PortTaken(Exception):
    """The port chosen was bound by another process before the server could bind it."""


def serve(data_dir: str, port: int) -> None:
    """The server process: milvus-lite's own server, stopped cleanly by SIGINT or SIGTERM.

    A process started in the background by a shell inherits an ignored SIGINT, and Python then
    never raises KeyboardInterrupt, which is how milvus-lite shuts down: both are set here."""
    from milvus_lite.adapter.grpc.server import run_server

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # One request at a time: milvus-lite does not guard concurrent writes to a collection.
    run_server(data_dir, host="127.0.0.1", port=port, max_workers=1)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _alive(known: dict[str, Any]) -> bool:
    return _is_same_process(known.get("pid", -1), known.get("started", -1.0)) and _answers(
        int(known.get("port", 0))
    )


def _stop_server(known: dict[str, Any] | None) -> None:
    """SIGINT: milvus-lite drains its requests and closes its data (then releases the lock)."""
    if not known or not _is_same_process(known["pid"], known.get("started", -1.0)):
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(known["pid"])
        process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except psutil.TimeoutExpired:
            process.kill()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
