"""A real headless Chromium (Debian's `chromium`), driven over its DevTools protocol.

The browser answers an HTTP basic-auth challenge as a person at its prompt would (with the
credentials given, or by cancelling), renders the page with its scripts, and hands back the
document's status, its visible text and a screenshot. The websocket is tornado's (a Flower
dependency), so nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClientConnection, websocket_connect

CHROMIUM = shutil.which("chromium")


@dataclass
class Page:
    """What the browser showed: the document's HTTP status and its visible text."""

    url: str
    status: int | None
    text: str


class Chromium:
    """One headless browser with one tab; use as an async context manager."""

    def __init__(self, profile: Path, artifacts: Path) -> None:
        self.profile = profile
        self.artifacts = artifacts
        self.process: subprocess.Popen[bytes] | None = None
        self.socket: WebSocketClientConnection | None = None
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.credentials: tuple[str, str] | None = None
        self.status: int | None = None
        self.loaded = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None
        self.handling: set[asyncio.Task[None]] = set()
        self.prompted = 0  # auth prompts answered during this visit

    async def __aenter__(self) -> Chromium:
        assert CHROMIUM is not None
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",  # the tests run as root in CI
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                "--window-size=1400,1600",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port = self._devtools_port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            targets = json.load(answer)
        page = next(t for t in targets if t["type"] == "page")
        self.socket = await websocket_connect(
            page["webSocketDebuggerUrl"], max_message_size=64 * 1024 * 1024
        )
        self.reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Network.enable")
        await self.send("Fetch.enable", handleAuthRequests=True, patterns=[{"urlPattern": "*"}])
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.socket is not None:
            self.socket.close()
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)

    def _devtools_port(self, timeout: float = 60) -> int:
        """Chromium writes the port it chose to DevToolsActivePort in its profile."""
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            time.sleep(0.1)
        raise RuntimeError("chromium did not open its DevTools port")

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.socket is not None
        message_id = next(self.ids)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[message_id] = answer
        await self.socket.write_message(
            json.dumps({"id": message_id, "method": method, "params": params})
        )
        reply = await asyncio.wait_for(answer, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    async def _read(self) -> None:
        assert self.socket is not None
        while (raw := await self.socket.read_message()) is not None:
            message = json.loads(raw)
            if "id" in message:
                future = self.pending.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message)
                continue
            task = asyncio.create_task(self._event(message["method"], message.get("params", {})))
            self.handling.add(task)
            task.add_done_callback(self.handling.discard)

    async def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Fetch.requestPaused":
            # A request the next navigation cancelled is gone: nothing to continue.
            with contextlib.suppress(RuntimeError):
                await self.send("Fetch.continueRequest", requestId=params["requestId"])
        elif method == "Fetch.authRequired":
            self.prompted += 1
            # A person types the credentials once; asked again, they were wrong: cancel.
            if self.credentials is None or self.prompted > 1:
                response = {"response": "CancelAuth"}
            else:
                user, password = self.credentials
                response = {
                    "response": "ProvideCredentials",
                    "username": user,
                    "password": password,
                }
            await self.send(
                "Fetch.continueWithAuth",
                requestId=params["requestId"],
                authChallengeResponse=response,
            )
        elif method == "Network.responseReceived" and params.get("type") == "Document":
            self.status = int(params["response"]["status"])
        elif method == "Page.loadEventFired":
            self.loaded.set()

    async def visit(
        self,
        url: str,
        *,
        credentials: tuple[str, str] | None = None,
        until: str | re.Pattern[str] | None = None,
        timeout: float = 60,
        screenshot: str | None = None,
    ) -> Page:
        """Open `url`, answering its auth prompt with `credentials` (or cancelling it), and
        wait for the load and, with `until`, for that text to be visible (scripts fill tables
        after the load)."""
        self.credentials = credentials
        self.prompted = 0
        self.status = None
        self.loaded.clear()
        await self.send("Page.navigate", url=url)
        await asyncio.wait_for(self.loaded.wait(), timeout)
        deadline = time.monotonic() + timeout
        text = await self.text()
        while until is not None and not re.search(until, text):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
            text = await self.text()
        if screenshot is not None:
            shot = await self.send("Page.captureScreenshot", format="png")
            (self.artifacts / screenshot).write_bytes(base64.b64decode(shot["data"]))
        return Page(url, self.status, text)

    async def reload_until(self, url: str, until: str, timeout: float, **kwargs: Any) -> Page:
        """Open `url` again until `until` shows (a page Flower renders on the server)."""
        deadline = time.monotonic() + timeout
        while True:
            page = await self.visit(url, until=until, timeout=10, **kwargs)
            if re.search(until, page.text) or time.monotonic() > deadline:
                return page
            await asyncio.sleep(1)

    async def text(self) -> str:
        found = await self.send(
            "Runtime.evaluate",
            expression="document.body ? document.body.innerText : ''",
            returnByValue=True,
        )
        return str(found["result"].get("value", ""))
