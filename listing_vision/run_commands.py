"""`rescore`, `reindex`, `runs` and `run`: bulk runs from the command line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

import typer

from db.runs import chunk_counts, find_run, list_runs
from listing_vision.command_context import app, command_settings, console, ready_engine
from listing_vision.runs_command import RunProgress, follow, print_runs
from listing_vision.servers import connected
from producer.enqueue import Producer
from producer.runs import RunProducer


@contextlib.contextmanager
def _run_producer() -> Iterator[RunProducer]:
    """A producer on the resolved servers, with a current schema."""
    settings = command_settings()
    with connected(settings, milvus=True) as resolved:
        ready_engine(settings, resolved).dispose()
        with Producer(resolved) as producer:
            yield RunProducer(producer)


@app.command()
def rescore(
    all_listings: Annotated[
        bool, typer.Option("--all", help="every listing (default: only stale or failed ones)")
    ] = False,
    model: Annotated[str | None, typer.Option(help="model id (default: the active model)")] = None,
    refetch: Annotated[
        bool, typer.Option(help="revalidate images with conditional requests")
    ] = False,
    recompute: Annotated[
        bool, typer.Option(help="recompute every similarity, even from unchanged inputs")
    ] = False,
    follow_it: Annotated[bool, typer.Option("--follow", help="show a live bar until done")] = False,
) -> None:
    """Start a rescoring run: current categories, prompts and thresholds applied to the
    catalogue from stored image embeddings (what beat runs nightly, with --all)."""
    with _run_producer() as runs:
        run_id = runs.start_rescore(
            model, scope="all" if all_listings else "stale", refetch=refetch, recompute=recompute
        )
        console.print(f"rescoring run {run_id} started")
        if follow_it:
            raise typer.Exit(follow(runs.sessions, run_id, console))


@app.command()
def reindex(
    model: Annotated[str | None, typer.Option(help="the model to embed the catalogue with")] = None,
    rollback: Annotated[
        bool, typer.Option("--rollback", help="switch back to the model the last reindex replaced")
    ] = False,
    follow_it: Annotated[bool, typer.Option("--follow", help="show a live bar until done")] = False,
) -> None:
    """Embed the catalogue with another model while the active one keeps serving, then switch
    to it in one transaction (a worker holding that model must run: `up` starts one)."""
    if rollback == (model is not None):
        raise typer.BadParameter("give either --model ID or --rollback")
    with _run_producer() as runs:
        if rollback:
            done = runs.rollback()
            catch_up = f"; rescoring run {done.catch_up} catches up" if done.catch_up else ""
            console.print(f"active model is {done.restored} again (was {done.replaced}){catch_up}")
            if done.mirror_alias is not None:
                console.print(f"Milvus alias lv_active names {done.mirror_alias}'s collection")
            return
        assert model is not None
        run_id = runs.start_reindex(model)
        console.print(f"reindex run {run_id} to {model} started")
        if follow_it:
            raise typer.Exit(follow(runs.sessions, run_id, console))


@app.command("runs")
def list_run_table(
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 20,
) -> None:
    """List the runs (rescoring, reindexing), newest first."""
    with _run_producer() as runs, runs.sessions() as session:
        print_runs(console, session, list_runs(session, limit))


@app.command("run")
def show_run(
    run_id: Annotated[str, typer.Argument(help="a run's id, or the start of it")],
    follow_it: Annotated[bool, typer.Option("--follow", help="a live bar until it ends")] = False,
    cancel: Annotated[bool, typer.Option("--cancel", help="stop it (resume goes on)")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="finish a cancelled or interrupted run")
    ] = False,
) -> None:
    """One run: counts, rate and ETA; --follow, --cancel or --resume it."""
    if sum((follow_it, cancel, resume)) > 1:
        raise typer.BadParameter("give at most one of --follow, --cancel, --resume")
    with _run_producer() as runs:
        with runs.sessions() as session:
            found_run = find_run(session, run_id)
            found, kind = found_run.run_id, found_run.kind
        if cancel:
            runs.cancel(found)
        if resume:
            if kind == "reindex":
                console.print("resuming: once its work is done, its model's index is built first")
            sent = runs.resume(found)
            console.print(f"resumed: {sent} chunk(s) sent")
        if follow_it:
            raise typer.Exit(follow(runs.sessions, found, console))
        with runs.sessions() as session:
            run = find_run(session, str(found))
            chunks = chunk_counts(session, found)
            progress = RunProgress.read(session, run)
        console.print(progress.line())
        console.print("chunks: " + ", ".join(f"{n} {state}" for state, n in sorted(chunks.items())))
        if run.error:
            console.print(f"error: {run.error}")
