"""Completing a run whose work is done; for a reindex, first building its model's index.

A reindex backfills its model with the index set aside (`db.embedding_index`), so the index is
built here, outside any transaction and without blocking writers, and only then does the run
switch the active model: the model that starts serving searches has its index. Any process
may complete a run (the worker that closes its last chunk, the producer of an empty catalogue,
beat's watch when the one before died); a second one finds the index building and leaves the
run to the first.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db import embedding_index, registered_models, runs
from db.runs import CompletedRun

log = logging.getLogger(__name__)


def complete_run(sessions: sessionmaker[Session], run_id: uuid.UUID) -> CompletedRun | None:
    """Mark the run succeeded if its work is done (for a reindex, once its model's index is
    built, and then switch models); None if it is not done or another process completes it."""
    with sessions.begin() as session:
        run = runs.done_run(session, run_id)
        dim = None if run is None else registered_models.embed_dim(session, run.model_id)
    if run is None:
        return None
    if run.kind == "reindex" and dim is not None:
        engine = sessions.kw["bind"]
        assert isinstance(engine, Engine)
        log.info("run %s: building the HNSW index of %s before the switch", run_id, run.model_id)
        if not embedding_index.build_index(engine, run.model_id, dim):
            log.info("run %s: another process is building the index; it completes the run", run_id)
            return None
    with sessions.begin() as session:
        return runs.complete_if_done(session, run_id)
