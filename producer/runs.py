"""Bulk runs, produced like ingestion: a run is recorded, its producer streams the catalogue by
keyset pagination and records chunks of listing ids (sized to the model's batch), commits, and
only then sends them. Memory stays flat whatever the catalogue size, and a producer that stops
halfway is continued from its recorded cursor (`resume`, or beat's watch).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from dataclasses import dataclass

from contract.broker import send_chunks
from contract.errors import one_line
from contract.registry import ModelSpec, get_spec
from db import registered_models, runs
from db.embedding_index import set_aside_empty_index
from db.milvus import ACTIVE_ALIAS, MirrorMismatch, MirrorUnavailable, open_store
from db.mirror import sync_alias
from db.restamp import mark_for_restamp
from db.run_completion import complete_run, finish_restamp
from db.runs import CompletedRun, NewChunk, NewRun, RunConflict, RunKind, RunScope
from db.schema import Run
from producer.enqueue import Producer

log = logging.getLogger(__name__)
CHUNKS_PER_COMMIT = 32  # chunks recorded per transaction while streaming the catalogue
RESCORE_CHUNK_BATCHES = 8
REINDEX_CHUNK_BATCHES = 2


class RunError(ValueError):
    """A run cannot be started, resumed or rolled back; the message says why."""


@dataclass(frozen=True)
class Rollback:
    """What `reindex --rollback` did: the model restored, the one it replaced, and the catch-up
    rescoring run for listings that changed meanwhile (None if none was needed)."""

    restored: str
    replaced: str
    catch_up: uuid.UUID | None
    mirror_alias: str | None = None  # the model the Milvus alias names now (None: no mirror)


class RunProducer:
    """Starts, produces, cancels, resumes and rolls back runs, over a `Producer`'s connections."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.sessions = producer.sessions

    def chunk_size(self, spec: ModelSpec, kind: RunKind) -> int:
        """Listings per chunk: `LV_RUN_CHUNK_SIZE`, else a multiple of the model's batch: a
        rescoring chunk mostly reads what is stored, so it takes many batches' worth (its
        bookkeeping is paid once); a reindex chunk is fetched and embedded, two batches."""
        settings = self.producer.settings
        if settings.run_chunk_size:
            return settings.run_chunk_size
        batch = spec.batch_max_size or settings.batch_max_size
        return batch * (RESCORE_CHUNK_BATCHES if kind == "rescore" else REINDEX_CHUNK_BATCHES)

    def start_rescore(
        self,
        model: str | None = None,
        *,
        scope: RunScope = "all",
        refetch: bool = False,
        recompute: bool = False,
    ) -> uuid.UUID:
        """Record a rescoring run of the active model (or `model`) and produce its chunks;
        `RunConflict` when a rescoring run is already pending or running."""
        spec = self.producer.resolve_model(model)
        chunk_size = self.chunk_size(spec, "rescore")
        new = NewRun("rescore", spec.model_id, scope, refetch, recompute, chunk_size)
        return self._start(spec, new)

    def start_reindex(self, model: str) -> uuid.UUID:
        """Record a reindex run that embeds the catalogue with `model` while the active model
        keeps serving; when it completes, `model` becomes the active model."""
        spec = get_spec(self.producer.registry, model)
        active = self.producer.resolve_model(None).model_id
        if spec.model_id == active:
            raise RunError(f"{spec.model_id} is already the active model")
        chunk_size = self.chunk_size(spec, "reindex")
        new = NewRun("reindex", spec.model_id, chunk_size=chunk_size, previous_model_id=active)
        return self._start(spec, new)

    def _start(self, spec: ModelSpec, new: NewRun) -> uuid.UUID:
        with self.sessions.begin() as session:
            registered_models.ensure_model(session, spec)
            if new.previous_model_id is not None:
                registered_models.ensure_model(
                    session, get_spec(self.producer.registry, new.previous_model_id)
                )
            run_id = runs.create_run(session, new)
            runs.set_total(session, run_id, runs.count_listings(session, new.scope, new.model_id))
            dim = registered_models.embed_dim(session, new.model_id)
        if new.kind == "reindex" and dim is not None:
            self._set_aside_index(new.model_id, dim)
        log.info("%s run %s of model %s recorded", new.kind, run_id, new.model_id)
        self.produce(run_id)
        return run_id

    def produce(self, run_id: uuid.UUID) -> int:
        """Record and send the run's remaining chunks, from its cursor; returns how many."""
        sent = 0
        while True:
            with self.sessions.begin() as session:
                run = session.get(Run, run_id, with_for_update=True)
                if run is None or run.status not in runs.ACTIVE_RUN or run.produced_at:
                    break
                page = runs.listing_page(
                    session,
                    after=run.cursor,
                    limit=run.chunk_size * CHUNKS_PER_COMMIT,
                    scope=runs.as_scope(run.scope),
                    model_id=run.model_id,
                )
                chunks = [
                    NewChunk(uuid.uuid4(), page[start : start + run.chunk_size])
                    for start in range(0, len(page), run.chunk_size)
                ]
                runs.record_chunks(session, run_id, chunks, page[-1] if page else run.cursor)
                last = len(page) < run.chunk_size * CHUNKS_PER_COMMIT
                if last:
                    runs.finish_production(session, run_id)
                model_id = run.model_id
            self._send([chunk.chunk_id for chunk in chunks], model_id)
            sent += len(chunks)
            if last:
                break
        self.complete(run_id)
        return sent

    def _set_aside_index(self, model_id: str, dim: int) -> None:
        """A reindex target's index, if a worker built it empty, is dropped: the backfill runs
        without it and the run's completion builds it (db.embedding_index). Best effort: the
        run is recorded already, and with the index kept it is only slower."""
        try:
            if set_aside_empty_index(self.producer.engine, model_id, dim):
                log.info("HNSW index of %s set aside: built once the backfill is done", model_id)
        except Exception as error:
            log.warning("HNSW index of %s kept during the backfill: %s", model_id, one_line(error))

    def _send(self, chunk_ids: list[uuid.UUID], model_id: str) -> None:
        """Sent only after the commit that recorded them; an unsent chunk is the reconciler's."""
        if not chunk_ids:
            return
        send_chunks(self.producer.celery, chunk_ids, model_id)
        with self.sessions.begin() as session:
            runs.mark_chunks_sent(session, chunk_ids)

    def complete(self, run_id: uuid.UUID, *, last_try: bool = False) -> CompletedRun | None:
        """Complete the run if its work is done: one with nothing to do (an empty catalogue) as
        soon as it is produced, one whose completing worker died when beat's watch notices
        (`last_try`: see `complete_run`)."""
        completed = complete_run(
            self.producer.engine,
            run_id,
            self.producer.settings.index_build_memory,
            last_try=last_try,
        )
        if completed is not None and completed.kind == "reindex":
            self.sync_mirror_alias()
            restamped = finish_restamp(self.producer.engine)
            completed = dataclasses.replace(completed, restamped=restamped)
        return completed

    def cancel(self, run_id: uuid.UUID) -> Run:
        """Stop a run: queued chunks are closed, running ones finish; `resume` goes on."""
        with self.sessions.begin() as session:
            run = runs.cancel_run(session, run_id)
        if run is None:
            raise RunError(f"no run {run_id}")
        return run

    def resume(self, run_id: uuid.UUID) -> int:
        """Go on with a cancelled, failed or interrupted run without redoing finished
        listings: its unfinished chunks are sent again, and the rest of the catalogue is
        produced. Returns how many chunks were sent."""
        with self.sessions.begin() as session:
            run = session.get(Run, run_id)
            if run is None:
                raise RunError(f"no run {run_id}")
            if run.status == "succeeded":
                raise RunError(f"run {run_id} has already succeeded")
            reopened = runs.reopen_run(session, run_id)
            model_id = run.model_id
        self._send(reopened, model_id)
        return len(reopened) + self.produce(run_id)

    def rollback(self) -> Rollback:
        """Switch back to the model a reindex replaced (its rows were kept); listings that
        changed since are rescored by it (a `stale` rescoring run)."""
        with self.sessions.begin() as session:
            row = registered_models.active_model_row(session)
            if row is None or row.chosen_by != "reindex" or row.previous_model_id is None:
                raise RunError("no reindex to roll back: the active model was never switched")
            if any(run.kind == "reindex" for run in runs.active_runs(session)):
                raise RunError("a reindex run is in progress: cancel it before rolling back")
            replaced, restored = row.model_id, row.previous_model_id
            registered_models.switch_active_model(session, restored)
            mark_for_restamp(session)
        alias = self.sync_mirror_alias()
        finish_restamp(self.producer.engine)
        catch_up = None
        try:
            catch_up = self.start_rescore(restored, scope="stale")
        except RunConflict as conflict:
            log.warning("no catch-up rescoring after the rollback: %s", conflict)
        return Rollback(restored, replaced, catch_up, alias)

    def sync_mirror_alias(self) -> str | None:
        """After a switch of the active model, the Milvus alias follows it (when a mirror is
        set); returns the model it names. Milvus away is logged, not raised: the switch is
        PostgreSQL's and has happened; workers and `listing-vision mirror` set the alias later."""
        settings = self.producer.settings
        if settings.milvus_uri is None:
            return None
        try:
            with open_store(settings) as store, self.sessions() as session:
                return sync_alias(session, store)
        except (MirrorUnavailable, MirrorMismatch) as error:
            log.warning(
                "Milvus alias %s not switched now: %s (`listing-vision mirror` switches it)",
                ACTIVE_ALIAS,
                error,
            )
            return None
