"""Operations on the command line: `health` (for people, probes and compose checks), `urls`,
`exporter` (the one Prometheus exporter of a deployment) and `flower`."""

from __future__ import annotations

import json
import signal
import socket
import threading
from datetime import timedelta
from typing import Annotated

import typer

from contract.broker import make_celery
from contract.settings import SettingsError
from listing_vision.command_context import app, command_settings, console
from listing_vision.health import Scope, check_health
from listing_vision.servers import connected


@app.command()
def health(
    json_output: Annotated[
        bool, typer.Option("--json", help="one JSON object (for probes) instead of lines")
    ] = False,
    stall: Annotated[
        float,
        typer.Option(
            help="seconds a model's work may wait with no job finished before it is stalled"
        ),
    ] = 300.0,
    model: Annotated[
        str | None,
        typer.Option(help="only this model: a live worker holds it and its work progresses"),
    ] = None,
    here: Annotated[
        bool,
        typer.Option(
            "--here", help="only workers on this host count (a container's or pod's probe)"
        ),
    ] = False,
) -> None:
    """Broker, database, schema, and workers alive and making progress: exit 0 when healthy,
    1 with one line per problem."""
    settings = command_settings()
    scope = Scope(model, socket.gethostname() if here else None)
    with connected(settings) as resolved:
        result = check_health(resolved, make_celery(resolved), timedelta(seconds=stall), scope)
    if json_output:
        payload = {"healthy": result.healthy, "problems": result.problems, **result.checks}
        console.print_json(json.dumps(payload, default=str))
    elif result.healthy:
        console.print("healthy: " + ", ".join(f"{k} {v}" for k, v in _summary(result.checks)))
    else:
        for problem in result.problems:
            console.print(problem, markup=False, highlight=False)
    raise typer.Exit(0 if result.healthy else 1)


@app.command()
def urls() -> None:
    """Where the stack is: the database, the broker, Flower, and how Celery's tools reach it
    (the embedded servers' URLs hold their passwords: this prints them for you, the owner)."""
    from listing_vision.embedded import running_urls

    settings = command_settings()
    running = running_urls(settings.home)
    database = settings.database_url or running.database_url
    broker = settings.broker_url or running.broker_url
    console.print(f"database  {database or '(not running: listing-vision up)'}", markup=False)
    console.print(f"broker    {broker or '(not running: listing-vision up)'}", markup=False)
    console.print(f"flower    http://127.0.0.1:{settings.flower_port}", markup=False)
    console.print(f"metrics   http://127.0.0.1:{settings.exporter_port}/metrics", markup=False)
    console.print("celery    celery -A listing_vision.celery_app inspect ping", markup=False)


@app.command()
def exporter(
    host: Annotated[
        str, typer.Option(help="address to listen on (127.0.0.1 to keep it on this host)")
    ] = "0.0.0.0",
    port: Annotated[
        int | None, typer.Option(help="port (default: LV_EXPORTER_PORT)", min=1, max=65535)
    ] = None,
) -> None:
    """Serve the deployment's Prometheus metrics: queue depth per model queue, queued and
    running jobs, and the progress of runs (one exporter per deployment, not per worker)."""
    from listing_vision.exporter import run_exporter

    settings = command_settings(service=True)
    chosen = port or settings.exporter_port
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with connected(settings) as resolved:
        try:
            run_exporter(resolved, host, chosen, stop)
        except OSError as error:
            raise SettingsError(f"exporter cannot listen on {host}:{chosen}: {error}") from None


@app.command()
def flower(
    address: Annotated[
        str,
        typer.Option(
            help="address to listen on; beyond 127.0.0.1 only with LV_FLOWER_USER/PASSWORD"
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(help="port (default: LV_FLOWER_PORT)", min=1, max=65535)
    ] = None,
) -> None:
    """Run Flower on the stack's broker: refused beyond 127.0.0.1 without complete
    credentials; with them, every page, the API and /metrics ask for them."""
    from listing_vision.flower import check_exposure, run_flower

    settings = command_settings(service=True)
    check_exposure(settings, address)  # before any server is started or reached
    with connected(settings) as resolved:
        run_flower(resolved, address, port or settings.flower_port)


def _summary(checks: dict[str, object]) -> list[tuple[str, object]]:
    workers = checks.get("workers") or []
    return [
        ("broker", checks.get("broker")),
        ("database", checks.get("database")),
        ("schema", checks.get("schema")),
        ("workers", len(workers) if isinstance(workers, list) else workers),
    ]
