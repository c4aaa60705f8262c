"""The `listing-vision` command line. Each command is thin: settings in, a module's function out."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from sqlalchemy import Engine

from listing_vision.embedded import EmbeddedError
from listing_vision.servers import connected
from listing_vision.settings import Settings, SettingsError, load_settings
from worker.models.registry import RegistryError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Check and index the images of an e-commerce catalogue.",
)
# Tables stay readable when piped (rich would otherwise squeeze them to 80 columns).
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True)
USER_ERRORS = (SettingsError, RegistryError, EmbeddedError)


def _settings(*, service: bool = False) -> Settings:
    """Settings, and logging: services log at LV_LOG_LEVEL, one-shot commands only warnings."""
    settings = load_settings()
    level = (
        settings.log_level
        if service
        else max(logging.WARNING, logging.getLevelName(settings.log_level))
    )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pgserver", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    return settings


def _engine(database_url: str | None, *, migrate: bool) -> Engine:
    from db.engine import make_engine
    from db.migrate import is_current, upgrade

    assert database_url is not None
    engine = make_engine(database_url)
    if migrate:
        upgrade(engine)
    elif not is_current(engine):
        raise SettingsError("the database schema is not up to date: run `listing-vision migrate`")
    return engine


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (Alembic)."""
    settings = _settings()
    with connected(settings, broker=False) as urls:
        _engine(urls.database_url, migrate=True).dispose()
    console.print("database schema is up to date")


@app.command()
def worker(
    model: Annotated[str | None, typer.Option(help="model id (default: the active model)")] = None,
    gpu: Annotated[int | None, typer.Option(help="pin to this GPU index")] = None,
) -> None:
    """Run one Celery worker holding one model warm (pinned to GPU N with --gpu N)."""
    if gpu is not None:  # before torch is imported anywhere in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    settings = _settings(service=True)
    with connected(settings) as urls:
        engine = _engine(urls.database_url, migrate=settings.database_url is None)
        model_id = model or _active_model(engine, settings)
        engine.dispose()
        from worker.main import run_worker

        assert urls.database_url and urls.broker_url
        run_worker(settings, model_id, urls.database_url, urls.broker_url, gpu)


@app.command()
def enqueue(
    file: Annotated[str, typer.Argument(help="JSON lines file of listing events, or - for stdin")],
    model: Annotated[str | None, typer.Option(help="model id (default: the active model)")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="block until the jobs finish")] = False,
    timeout: Annotated[float | None, typer.Option(help="give up waiting after N seconds")] = None,
) -> None:
    """Queue analysis jobs for listing events (exit 2 if a line was refused, 1 if any failed)."""
    from listing_vision.enqueue_command import enqueue_file

    settings = _settings()
    with connected(settings) as urls:
        _engine(urls.database_url, migrate=settings.database_url is None).dispose()
        code = enqueue_file(settings, urls, file, model=model, wait=wait, timeout=timeout)
    raise typer.Exit(code)


@app.command()
def results(
    since: Annotated[int, typer.Option(help="only rows with change_seq above this")] = 0,
    format: Annotated[str, typer.Option(help="table or jsonl")] = "table",
    model: Annotated[str | None, typer.Option(help="only this model's rows")] = None,
    limit: Annotated[int, typer.Option(help="at most this many rows")] = 1000,
) -> None:
    """Print results as the catalogue polls them (change_seq > SINCE, oldest first)."""
    from db.engine import make_sessions
    from db.results import poll_results
    from listing_vision.output import print_results_jsonl, print_results_table

    if format not in ("table", "jsonl"):
        raise SettingsError("--format must be table or jsonl")
    settings = _settings()
    with connected(settings, broker=False) as urls:
        engine = _engine(urls.database_url, migrate=settings.database_url is None)
        with make_sessions(engine)() as session:
            rows = poll_results(session, since=since, limit=limit, model_id=model)
        engine.dispose()
    if format == "jsonl":
        print_results_jsonl(rows)
    else:
        print_results_table(console, rows)


@app.command("models")
def list_models() -> None:
    """List the model registry, marking the active model."""
    from listing_vision.output import print_models_table
    from worker.models.registry import load_registry

    settings = _settings()
    registry = load_registry(settings.models_file)
    with connected(settings, broker=False) as urls:
        engine = _engine(urls.database_url, migrate=settings.database_url is None)
        active = _active_model(engine, settings)
        engine.dispose()
    print_models_table(console, registry.values(), active)


@app.command()
def similar(
    listing_id: Annotated[str, typer.Argument(help="the listing to find neighbours of")],
    model: Annotated[str | None, typer.Option(help="model id (default: the active model)")] = None,
    k: Annotated[int, typer.Option("-k", help="how many listings")] = 10,
    format: Annotated[str, typer.Option(help="table or jsonl")] = "table",
) -> None:
    """The K listings whose images are nearest (cosine, pgvector HNSW), the listing left out."""
    from db.embeddings import neighbour_rows
    from db.engine import make_sessions
    from db.models import embed_dim
    from listing_vision.output import print_neighbours

    if format not in ("table", "jsonl"):
        raise SettingsError("--format must be table or jsonl")
    settings = _settings()
    with connected(settings, broker=False) as urls:
        engine = _engine(urls.database_url, migrate=settings.database_url is None)
        model_id = model or _active_model(engine, settings)
        with make_sessions(engine)() as session:
            dim = embed_dim(session, model_id)
            if dim is None:
                raise SettingsError(f"model {model_id} has no embeddings yet (no worker ran it)")
            rows = neighbour_rows(session, listing_id, model_id, dim, k)
        engine.dispose()
    print_neighbours(console, rows, format)


@app.command()
def up() -> None:
    """Run the whole stack in the foreground: servers, migrations, worker(s), Flower."""
    from listing_vision.supervisor import run_stack

    settings = _settings(service=True)
    with connected(settings) as urls:
        engine = _engine(urls.database_url, migrate=True)
        model_id = _active_model(engine, settings)
        engine.dispose()
        raise typer.Exit(run_stack(settings, urls, model_id))


def _active_model(engine: Engine, settings: Settings) -> str:
    from db.engine import make_sessions
    from db.models import active_model

    with make_sessions(engine)() as session:
        return active_model(session, settings.model)


def main() -> None:
    """Console entry point: user errors are one clear line and exit status 2."""
    try:
        app()
    except USER_ERRORS as error:
        errors.print(f"[red]error:[/red] {error}")
        sys.exit(2)
