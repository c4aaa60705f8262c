"""Completing a run whose work is done; for a reindex, first building its model's index.

A reindex backfills its model with the index set aside (`db.embedding_index`), so the index is
built here, outside any transaction and without blocking writers, and only then does the run
switch the active model: the model that starts serving searches has its index. Any process
may complete a run (the worker that closes its last chunk, the producer of an empty catalogue,
beat's watch when the one before died); a second one finds the index building and leaves the
run to the first.

A build that fails for a reason that lasts (a row the index cannot take, a limit, a bad
`LV_INDEX_BUILD_MEMORY`) fails the run, with the server's words and the active model
unchanged; `run --resume` builds again. Passing trouble (the connection lost, a deadlock, the
server restarting, a cancelled build) and another model's build holding the build lock leave
the run running, done but open: beat's watch completes it later, and fails it when the same
trouble is still there at its last try (`last_try`).
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from contract.errors import one_line
from db import embedding_index, registered_models, restamp, runs
from db.engine import make_sessions
from db.runs import CompletedRun

log = logging.getLogger(__name__)

# SQLSTATE classes and codes of trouble that passes: connection exceptions, transaction
# rollbacks (deadlock, serialization), too many connections, a read-only server (a failover
# under way), a lock not available, a cancel (an operator's pg_cancel_backend; `run --cancel`
# is how a run is stopped), an administrator's or a crash's shutdown, a server not yet
# accepting connections. Out of memory or disk lasts: LV_INDEX_BUILD_MEMORY or the disk needs
# an operator, then `run --resume`.
_PASSING_CLASSES = ("08", "40")
_PASSING_CODES = ("25006", "53300", "55P03", "57014", "57P01", "57P02", "57P03")


def complete_run(
    engine: Engine, run_id: uuid.UUID, index_memory: str | None = None, *, last_try: bool = False
) -> CompletedRun | None:
    """Mark the run succeeded if its work is done (for a reindex, once its model's index is
    built, and then switch models; the caller then runs `finish_restamp`); None if it is not
    done, another process completes it, or the index build failed (the run is then `failed`,
    or left for beat's watch when the trouble passes). `last_try`: beat's watch has tried
    often enough, so passing trouble fails the run too (a build that crashes the server every
    time must not go on doing so)."""
    sessions = make_sessions(engine)
    with sessions.begin() as session:
        run = runs.done_run(session, run_id)
        dim = None if run is None else registered_models.embed_dim(session, run.model_id)
    if run is None:
        return None
    if run.kind == "reindex" and dim is not None:
        log.info("run %s: building the HNSW index of %s before the switch", run_id, run.model_id)
        try:
            built = embedding_index.build_index(engine, run.model_id, dim, index_memory)
        except SQLAlchemyError as error:
            said = one_line(getattr(error, "orig", None) or error)  # the server's words alone
            why = f"the HNSW index of {run.model_id} could not be built: {said}"
            if passing(error):
                if not last_try:
                    log.warning("run %s left open (beat's watch completes it): %s", run_id, why)
                    return None
                why += " (beat's watch gave up after trying again every minute)"
            log.error("run %s failed: %s", run_id, why)
            with sessions.begin() as session:
                runs.fail_run(session, run_id, why)
            return None
        if not built:
            log.info("run %s: its HNSW index is being built by another process", run_id)
            return None
    with sessions.begin() as session:
        return runs.complete_if_done(session, run_id)


def finish_restamp(engine: Engine, seconds: float | None = None) -> int:
    """After a switch (and once the Milvus alias follows it), give the active model's rows
    their new change_seq (`db.restamp`), to the end or for about `seconds`; the rows
    restamped. Trouble is logged, not raised: the switch has happened, and beat's watch goes
    on from the last batch within a minute."""
    try:
        return restamp.restamp_pending(engine, seconds=seconds)
    except SQLAlchemyError as error:
        log.warning("restamp after the switch paused (beat's watch goes on): %s", one_line(error))
        return 0


def passing(error: SQLAlchemyError) -> bool:
    """Whether the error is trouble that passes, worth trying again later: a known passing
    SQLSTATE, or no SQLSTATE at all (the server never answered: no connection, a pool
    timeout)."""
    code = getattr(getattr(error, "orig", None), "sqlstate", None)
    if not code:
        return True
    return code[:2] in _PASSING_CLASSES or code in _PASSING_CODES
