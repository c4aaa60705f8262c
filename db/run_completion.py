"""Completing a run whose work is done; for a reindex, first building its model's index.

A reindex backfills its model with the index set aside (`db.embedding_index`), so the index is
built here, outside any transaction and without blocking writers, and only then does the run
switch the active model: the model that starts serving searches has its index. Any process
may complete a run (the worker that closes its last chunk, the producer of an empty catalogue,
beat's watch when the one before died); a second one finds the index building and leaves the
run to the first. A build that fails fails the run, with the error and the active model
unchanged; `run --resume` builds again.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from contract.errors import one_line
from db import embedding_index, registered_models, runs
from db.runs import CompletedRun

log = logging.getLogger(__name__)


def complete_run(
    sessions: sessionmaker[Session], run_id: uuid.UUID, index_memory: str | None = None
) -> CompletedRun | None:
    """Mark the run succeeded if its work is done (for a reindex, once its model's index is
    built, and then switch models); None if it is not done, another process completes it, or
    the index build failed (the run is then `failed`)."""
    with sessions.begin() as session:
        run = runs.done_run(session, run_id)
        dim = None if run is None else registered_models.embed_dim(session, run.model_id)
    if run is None:
        return None
    if run.kind == "reindex" and dim is not None:
        engine = sessions.kw["bind"]
        assert isinstance(engine, Engine)
        log.info("run %s: building the HNSW index of %s before the switch", run_id, run.model_id)
        try:
            built = embedding_index.build_index(engine, run.model_id, dim, index_memory)
        except SQLAlchemyError as error:
            said = one_line(getattr(error, "orig", None) or error)  # the server's words alone
            why = f"the HNSW index of {run.model_id} could not be built: {said}"
            log.error("run %s failed: %s", run_id, why)
            with sessions.begin() as session:
                runs.fail_run(session, run_id, why)
            return None
        if not built:
            log.info("run %s: another process is building the index; it completes the run", run_id)
            return None
    with sessions.begin() as session:
        return runs.complete_if_done(session, run_id)
