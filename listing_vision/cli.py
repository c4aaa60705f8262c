"""The `listing-vision` command line. Each command is thin: settings in, a module's function out."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from contract.registry import RegistryError, configured_spec, load_registry
from contract.settings import SettingsError
from db.registered_models import active_model_id
from db.runs import RunConflict, RunNotFound
from listing_vision.command_context import (
    OutputFormat,
    app,
    command_settings,
    console,
    errors,
    migrated_engine,
    read_database,
    ready_engine,
)
from listing_vision.embedded import EmbeddedError
from listing_vision.servers import connected
from producer.enqueue import DatabaseUnavailable
from producer.runs import RunError

USER_ERRORS: tuple[type[Exception], ...] = (
    SettingsError,
    RegistryError,
    EmbeddedError,
    RunConflict,
    RunNotFound,
    RunError,
    DatabaseUnavailable,
)


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (Alembic)."""
    settings = command_settings()
    with connected(settings, broker=False) as resolved:
        migrated_engine(resolved).dispose()
    console.print("database schema is up to date")


@app.command()
def worker(
    model: Annotated[str | None, typer.Option(help="model id (default: the active model)")] = None,
    gpu: Annotated[str | None, typer.Option(help="pin to this GPU (index or UUID)")] = None,
) -> None:
    """Run one Celery worker holding one model warm (pinned to GPU N with --gpu N)."""
    if gpu is not None:  # before torch is imported anywhere in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    settings = command_settings(service=True)
    with connected(settings, milvus=True) as resolved:
        engine = ready_engine(settings, resolved)
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

    _readable(file)
    settings = command_settings()
    with connected(settings) as resolved:
        ready_engine(settings, resolved).dispose()
        code = enqueue_file(resolved, file, model=model, wait=wait, timeout=timeout)
    raise typer.Exit(code)


def _readable(path: str) -> None:
    """An unreadable FILE is bad usage (exit 2), found before any server is started."""
    if path == "-":
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise typer.BadParameter(
            f"cannot read {path}: {error.strerror}", param_hint="FILE"
        ) from None


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

    with read_database(command_settings()) as (_, session):
        rows = poll_results(session, since=since, limit=limit, model_id=model)
    if format is OutputFormat.jsonl:
        print_results_jsonl(rows)
    else:
        print_results_table(console, rows)


@app.command("models")
def list_models() -> None:
    """List the model registry, marking the active model."""
    from listing_vision.output import print_models_table

    settings = command_settings()
    registry = load_registry(settings.models_file)
    configured_spec(registry, settings.model)
    with read_database(settings) as (engine, _):
        active = active_model_id(engine, settings.model)
    print_models_table(console, registry.values(), active)


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

    settings = command_settings()
    with connected(settings) as resolved:
        ready_engine(settings, resolved).dispose()
        options = DemoOptions(model, count=listings, seed=seed, timeout=timeout, report=report)
        try:
            code = run_demo(resolved, options)
        except DemoError as error:
            errors.print(f"[red]demo failed:[/red] {error}")
            code = 1
    raise typer.Exit(code)


@app.command()
def beat() -> None:
    """Run Celery beat: the scheduled rescoring (LV_RESCORE_SCHEDULE) and the watch over runs
    (one per deployment; `up` starts it)."""
    from listing_vision.beat import run_beat

    settings = command_settings(service=True)
    with connected(settings, milvus=True) as resolved:
        ready_engine(settings, resolved).dispose()
        run_beat(resolved)


@app.command()
def up() -> None:
    """Run the whole stack in the foreground: servers, migrations, workers (the active model's
    and each running run's), beat, Flower; Ctrl-C stops it all."""
    from db.engine import make_sessions
    from db.registered_models import record_default_model
    from listing_vision.up import run_stack

    settings = command_settings(service=True)
    with connected(settings, milvus=True) as resolved:
        engine = migrated_engine(resolved)
        default = configured_spec(load_registry(settings.models_file), settings.model)
        with make_sessions(engine).begin() as session:
            record_default_model(session, default)
        engine.dispose()
        raise typer.Exit(run_stack(resolved))


def main() -> None:
    """Console entry point: user errors are one clear line and exit status 2."""
    from listing_vision import (  # noqa: F401  (they register their commands)
        calibrate_command,
        compare_command,
        health_command,
        mirror_command,
        run_commands,
        similar_command,
        train_command,
        workers_command,
    )

    try:
        app()
    except USER_ERRORS as error:
        errors.print(f"[red]error:[/red] {error}")
        sys.exit(2)
