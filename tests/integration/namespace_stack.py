"""The whole stack inside a network namespace of its own, for redirects to private, loopback
and metadata addresses (run by test_namespace_redirects.py as
`python -m tests.integration.namespace_stack HOME MODEL_DIR`, MODEL_DIR the session's tiny
open_clip folder, after the namespace's loopback was given 169.254.169.254, 10.20.30.40 and
10.99.0.1; never run on a real network).

An image host on 10.99.0.1 (the one private network the worker is allowed) redirects to each
forbidden address, where a listener records any request it gets. Prints one JSON object: the
result row of each listing and what each forbidden listener saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sqlalchemy import text

from contract.settings import load_settings
from db.engine import make_engine, make_sessions
from db.migrate import upgrade
from listing_vision.embedded import EmbeddedServers
from producer.enqueue import Producer
from tests import images

FORBIDDEN = {
    "metadata": ("169.254.169.254", 80),
    "private": ("10.20.30.40", 80),
    "loopback": ("127.0.0.1", 8081),
}
REDIRECTS = {
    "to-metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "to-metadata-decimal": "http://2852039166/latest/meta-data/",  # 169.254.169.254 as a number
    "to-private": "http://10.20.30.40/a.jpg",
    "to-loopback": "http://127.0.0.1:8081/admin",
    "to-localhost": "http://localhost:8081/admin",
}
HOST = ("10.99.0.1", 80)


def listen(address: tuple[str, int], seen: list[str], routes: dict[str, bytes]) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            route = self.path.strip("/")
            if route in REDIRECTS:
                self.send_response(302)
                self.send_header("Location", REDIRECTS[route])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = routes.get(route, b"secret")
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(address, Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main(home: Path, model_dir: Path) -> None:
    seen: dict[str, list[str]] = {name: [] for name in [*FORBIDDEN, "host"]}
    for name, address in FORBIDDEN.items():
        listen(address, seen[name], {})
    photo = images.save(images.product_image("gold", "circle"), home / "ok.jpg").read_bytes()
    listen(HOST, seen["host"], {"ok.jpg": photo})

    models = home / "models.toml"
    models.write_text(
        f'[models.tiny]\nbackend = "open_clip"\nname = "local-dir:{model_dir}"\nthreshold = 0.1\n'
    )
    with EmbeddedServers(home / "lv") as urls:
        assert urls.database_url and urls.broker_url
        upgrade(make_engine(urls.database_url))
        env = {k: v for k, v in os.environ.items() if not k.startswith("LV_")}
        env.update(
            LV_HOME=str(home / "lv"),
            LV_DATABASE_URL=urls.database_url,
            LV_BROKER_URL=urls.broker_url,
            LV_MODELS_FILE=str(models),
            LV_MODEL="tiny",
            LV_ALLOWED_PRIVATE_NETWORKS="10.99.0.0/24",  # the image host, nothing else
            LV_FETCH_TIMEOUT="3",
            LV_RETRY_BACKOFF="0.2",
            PYTHONUNBUFFERED="1",
        )
        log = home / "worker.log"
        with open(log, "wb") as output:
            worker = subprocess.Popen(
                [sys.executable, "-m", "listing_vision", "worker", "--model", "tiny"],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            rows = run_listings(env, log)
        finally:
            worker.terminate()
            worker.wait(60)
    print(json.dumps({"rows": rows, "seen": seen}))


def run_listings(env: dict[str, str], log: Path) -> dict[str, dict[str, str | None]]:
    deadline = time.monotonic() + 120
    while "ready." not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    settings = load_settings(**{k[3:].lower(): v for k, v in env.items() if k.startswith("LV_")})
    tag = uuid.uuid4().hex[:6]
    routes = ["ok.jpg", *REDIRECTS]
    events = [
        {
            "listing_id": f"ns-{tag}-{route}",
            "title": "a gold ring",
            "image_url": f"http://{HOST[0]}/{route}",
        }
        for route in routes
    ]
    with Producer(settings) as producer:
        report = producer.enqueue(events, model="tiny")
        counts = producer.wait(report.job_ids, timeout=90, poll_interval=0.3)
        assert sum(counts.values()) == len(routes), (counts, log.read_text()[-3000:])
    sessions = make_sessions(make_engine(settings.require_database_url()))
    with sessions() as session:
        found = session.execute(
            text("SELECT listing_id, status, error FROM model_results WHERE listing_id LIKE :p"),
            {"p": f"ns-{tag}-%"},
        ).all()
    return {
        listing_id.removeprefix(f"ns-{tag}-"): {"status": status, "error": error}
        for listing_id, status, error in found
    }


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
