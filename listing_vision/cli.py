"""The `listing-vision` command line. Each command is thin: settings in, a module's function out."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from contract.registry import RegistryError
from contract.settings import Settings, SettingsError, load_settings
from db.registered_models import active_model_id
from listing_vision.embedded import EmbeddedError
from listing_vision.servers import connected

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Check and index the images of an e-commerce catalogue.",
)
# Tables stay readable when piped (rich would otherwise squeeze them to 80 columns).
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True)
USER_ERRORS: tuple[type[Exception], ...] = (SettingsError, RegistryError, EmbeddedError)


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


def _migrated_engine(resolved: Settings) -> Engine:
    """An engine on a database brought up to date first."""
    from db.engine import make_engine
    from db.migrate import upgrade

    engine = make_engine(resolved.require_database_url())
    upgrade(engine)
    return engine


def _ready_engine(configured: Settings, resolved: Settings) -> Engine:
    """An engine on a current schema: the embedded database (`configured` names none) is
    migrated on the fly, no set-up; a configured one must have been migrated by
    `listing-vision migrate`."""
    from db.engine import make_engine
    from db.migrate import is_current

    if configured.database_url is None:
        return _migrated_engine(resolved)
    engine = make_engine(resolved.require_database_url())
    if not is_current(engine):
        raise SettingsError("the database schema is not up to date: run `listing-vision migrate`")
    return engine


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (Alembic)."""
    settings = _settings()
    with connected(settings, broker=False) as resolved:
        _migrated_engine(resolved).dispose()
    console.print("database schema is up to date")


@app.command()
def worker(
    model: Annotated[str | None, typer.Option(help="model id (default: the active model)")] = None,
    gpu: Annotated[str | None, typer.Option(help="pin to this GPU (index or UUID)")] = None,
) -> None:
    """Run one Celery worker holding one model warm (pinned to GPU N with --gpu N)."""
    if gpu is not None:  # before torch is imported anywhere in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    settings = _settings(service=True)
    with connected(settings) as resolved:
        engine = _ready_engine(settings, resolved)
        model_id = model or active_model_id(engine, settings.model)
        engine.dispose()
        from worker.main import run_worker

        run_worker(resolved, model_id, gpu)


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
    with connected(settings) as resolved:
        _ready_engine(settings, resolved).dispose()
        code = enqueue_file(resolved, file, model=model, wait=wait, timeout=timeout)
    raise typer.Exit(code)


class OutputFormat(StrEnum):
    table = "table"
    jsonl = "jsonl"


@contextlib.contextmanager
def _database(settings: Settings) -> Iterator[tuple[Engine, Session]]:
    """A session on a current schema, for commands that only read the database."""
    from db.engine import make_sessions

    with connected(settings, broker=False) as resolved:
        engine = _ready_engine(settings, resolved)
        try:
            with make_sessions(engine)() as session:
                yield engine, session
        finally:
            engine.dispose()


@app.command()
def results(
    since: Annotated[int, typer.Option(help="only rows with change_seq above this")] = 0,
    format: Annotated[OutputFormat, typer.Option(help="table or jsonl")] = OutputFormat.table,
    model: Annotated[str | None, typer.Option(help="only this model's rows")] = None,
    limit: Annotated[int, typer.Option(help="at most this many rows")] = 1000,
) -> None:
    """Print results as the catalogue polls them (change_seq > SINCE, oldest first)."""
    from db.results import poll_results
    from listing_vision.output import print_results_jsonl, print_results_table

    with _database(_settings()) as (_, session):
        rows = poll_results(session, since=since, limit=limit, model_id=model)
    if format is OutputFormat.jsonl:
        print_results_jsonl(rows)
    else:
        print_results_table(console, rows)


@app.command("models")
def list_models() -> None:
    """List the model registry, marking the active model."""
    from contract.registry import load_registry
    from listing_vision.output import print_models_table

    settings = _settings()
    registry = load_registry(settings.models_file)
    with _database(settings) as (engine, _):
        active = active_model_id(engine, settings.model)
    print_models_table(console, registry.values(), active)


@app.command()
def similar(
    listing_id: Annotated[str, typer.Argument(help="the listing to find neighbours of")],
    model: Annotated[str | None, typer.Option(help="model id (default: the active model)")] = None,
    k: Annotated[int, typer.Option("-k", help="how many listings")] = 10,
    format: Annotated[OutputFormat, typer.Option(help="table or jsonl")] = OutputFormat.table,
) -> None:
    """The K listings whose images are nearest (cosine, pgvector HNSW), the listing left out."""
    from db.embeddings import neighbour_rows
    from db.registered_models import embed_dim
    from listing_vision.output import print_neighbours

    settings = _settings()
    with _database(settings) as (engine, session):
        model_id = model or active_model_id(engine, settings.model)
        dim = embed_dim(session, model_id)
        if dim is None:
            raise SettingsError(f"model {model_id} has no embeddings yet (no worker ran it)")
        rows = neighbour_rows(session, listing_id, model_id, dim, k)
    print_neighbours(console, rows, format.value)


@app.command()
def demo(
    model: Annotated[
        str, typer.Option(help="model id (lv-toy is bundled; others need weights)")
    ] = "lv-toy",
    listings: Annotated[int, typer.Option(help="size of the sample catalogue")] = 120,
    seed: Annotated[int, typer.Option(help="seed of the sample catalogue")] = 2026,
    timeout: Annotated[float, typer.Option(help="give up after N seconds")] = 900,
    report: Annotated[Path | None, typer.Option(help="also write the metrics as JSON here")] = None,
) -> None:
    """The one-command tour: a sample catalogue with planted mismatches, scored end to end."""
    from listing_vision.demo.run import DemoError, DemoOptions, run_demo

    settings = _settings()
    with connected(settings) as resolved:
        _ready_engine(settings, resolved).dispose()
        options = DemoOptions(model, count=listings, seed=seed, timeout=timeout, report=report)
        try:
            code = run_demo(resolved, options)
        except DemoError as error:
            errors.print(f"[red]demo failed:[/red] {error}")
            code = 1
    raise typer.Exit(code)


@app.command()
def train(
    pairs: Annotated[Path, typer.Option(help="CSV with columns image,text (paths relative to it)")],
    out: Annotated[Path, typer.Option(help="folder to write the trained local-dir: model to")],
    model: Annotated[
        str, typer.Option(help="registry id of the open_clip model to start from")
    ] = "clip-vit-b32",
    epochs: Annotated[int, typer.Option(min=1)] = 5,
    batch_size: Annotated[int, typer.Option(min=2)] = 64,
    lr: Annotated[float, typer.Option(help="peak learning rate (warm-up, then cosine)")] = 5e-5,
    seed: int = 0,
    half: Annotated[bool, typer.Option(help="store the weights in fp16")] = False,
) -> None:
    """Fine-tune an open_clip model on image/text pairs; writes a model the registry can name."""
    from contract.registry import get_spec, load_registry
    from listing_vision.training import TrainConfig, TrainingError, read_pairs, train_open_clip

    settings = _settings()
    spec = get_spec(load_registry(settings.models_file), model)
    try:
        report = train_open_clip(
            spec,
            read_pairs(pairs),
            out.resolve(),
            TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, half=half),
            log=console.print,
        )
    except TrainingError as error:
        raise SettingsError(str(error)) from None
    threshold = "" if spec.threshold is None else f"\nthreshold = {spec.threshold}"
    console.print(
        f"trained {report.steps} steps (loss {report.first_loss:.3f} -> {report.last_loss:.3f}); "
        f'add to LV_MODELS_FILE:\n\n[models.{spec.model_id}-finetuned]\nbackend = "open_clip"\n'
        f'name = "local-dir:{report.out_dir}"{threshold}\n',
        markup=False,
        highlight=False,
    )


@app.command()
def up() -> None:
    """Run the whole stack in the foreground: servers, migrations, worker(s), Flower."""
    from listing_vision.supervisor import run_stack

    settings = _settings(service=True)
    with connected(settings) as resolved:
        engine = _migrated_engine(resolved)
        model_id = active_model_id(engine, settings.model)
        engine.dispose()
        raise typer.Exit(run_stack(resolved, model_id))


def main() -> None:
    """Console entry point: user errors are one clear line and exit status 2."""
    try:
        app()
    except USER_ERRORS as error:
        errors.print(f"[red]error:[/red] {error}")
        sys.exit(2)
