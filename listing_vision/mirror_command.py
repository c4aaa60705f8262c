"""`listing-vision mirror`: catch the Milvus mirror up with pgvector, or check how far behind
it is (docs/milvus-mirror.md)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

import typer
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from contract.settings import Settings, SettingsError
from db.engine import make_sessions
from db.milvus import (
    ACTIVE_ALIAS,
    MilvusStore,
    MirrorMismatch,
    MirrorUnavailable,
    collection_name,
    open_store,
)
from db.mirror import CatchUp, catch_up, embedded_models, sync_alias
from listing_vision.command_context import app, command_settings, console, errors, ready_engine
from listing_vision.servers import connected


@app.command()
def mirror(
    models: Annotated[
        list[str] | None,
        typer.Option("--model", help="a model id (repeatable; default: every embedded model)"),
    ] = None,
    rewrite: Annotated[
        bool, typer.Option("--all", help="upsert every vector again, not only missing ones")
    ] = False,
    check: Annotated[
        bool, typer.Option("--check", help="only compare counts and the alias; exit 1 if behind")
    ] = False,
) -> None:
    """Copy to Milvus the embeddings it lacks (pgvector is the source of truth), in pages, and
    point the `lv_active` alias at the active model's collection. Idempotent."""
    settings = command_settings()
    if settings.milvus_uri is None:
        raise SettingsError("LV_MILVUS_URI is not set: there is no Milvus mirror to catch up")
    with connected(settings, broker=False, milvus=True) as resolved:
        engine = ready_engine(settings, resolved)
        sessions = make_sessions(engine)
        try:
            with _store(resolved) as store:
                with sessions() as session:
                    chosen = list(models) if models else embedded_models(session)
                if check:
                    status = _check(sessions, store, chosen)
                else:
                    status = _catch_up(sessions, store, chosen, rewrite)
        finally:
            engine.dispose()
    raise typer.Exit(status)


def _store(resolved: Settings) -> MilvusStore:
    try:
        return open_store(resolved)
    except MirrorUnavailable as error:
        errors.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None


def _catch_up(
    sessions: sessionmaker[Session], store: MilvusStore, models: list[str], rewrite: bool
) -> int:
    status = 0
    for model_id in models:
        started = time.monotonic()
        try:
            report = catch_up(
                sessions, store, model_id, rewrite=rewrite, progress=_progress(model_id)
            )
        except (MirrorUnavailable, MirrorMismatch) as error:
            errors.print(f"[red]{model_id}:[/red] {error}")
            status = 1
            continue
        console.print(_line(report, time.monotonic() - started))
    try:
        with sessions() as session:
            active = sync_alias(session, store)
    except (MirrorUnavailable, MirrorMismatch) as error:
        errors.print(f"[red]alias {ACTIVE_ALIAS}:[/red] {error}")
        return 1
    if active is not None:
        console.print(f"alias {ACTIVE_ALIAS} names {collection_name(active)} ({active})")
    return status


def _progress(model_id: str) -> Callable[[CatchUp], None]:
    last = [time.monotonic()]

    def show(report: CatchUp) -> None:
        if time.monotonic() - last[0] >= 2.0:
            last[0] = time.monotonic()
            console.print(f"  {model_id}: {report.stored:,} checked, {report.written:,} written")

    return show


def _line(report: CatchUp, seconds: float) -> str:
    return (
        f"{report.model_id}: {report.stored:,} embedding(s) in pgvector, {report.present:,} "
        f"already in Milvus, {report.written:,} written ({seconds:.1f} s)"
    )


def _check(sessions: sessionmaker[Session], store: MilvusStore, models: list[str]) -> int:
    """Counts per model and where the alias points; 1 when anything is behind."""
    status = 0
    try:
        with sessions() as session:
            for model_id in models:
                stored = _stored_count(session, model_id)
                mirrored = store.count(model_id)
                behind = max(0, stored - mirrored)
                status |= behind > 0
                state = f"{behind:,} behind" if behind else "up to date"
                console.print(
                    f"{model_id}: {stored:,} in pgvector, {mirrored:,} in Milvus "
                    f"({collection_name(model_id)}): {state}"
                )
            active = session.scalar(text("SELECT model_id FROM active_model"))
        target = store.alias_target()
    except MirrorUnavailable as error:
        errors.print(f"[red]error:[/red] {error}")
        return 1
    expected = collection_name(active) if active else None
    if target != expected:
        status = 1
        console.print(f"alias {ACTIVE_ALIAS} names {target}, the active model {active}: behind")
    else:
        console.print(f"alias {ACTIVE_ALIAS} names {target} ({active})")
    return int(status)


def _stored_count(session: Session, model_id: str) -> int:
    return int(
        session.scalar(
            text("SELECT count(*) FROM embeddings WHERE model_id = :model_id"),
            {"model_id": model_id},
        )
        or 0
    )
