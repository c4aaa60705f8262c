"""`listing-vision health`: broker, database, schema, and workers that are alive and making
progress. A worker answering ping is not enough: a model with work waiting longer than
`stall` and no job finished in that time is unhealthy, whoever answers.

A probe scopes it (`Scope`): a worker container asks about its own model (`--model`) and
its own host (`--here`), so another model's stall or a worker elsewhere never restarts it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery import Celery

from contract.errors import one_line
from contract.settings import Settings


@dataclass
class Health:
    """What was checked (for `--json`) and one line per problem."""

    checks: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Scope:
    """What a check is about: every model (None) or one; workers anywhere (None) or only on
    one host. On one host without a model, only that a process there answers (beat's probe)."""

    model: str | None = None
    host: str | None = None


def check_health(
    settings: Settings, app: Celery, stall: timedelta, scope: Scope | None = None
) -> Health:
    """Every check, each independent of the others' failures."""
    scope = scope or Scope()
    health = Health()
    workers = _check_broker(app, health)
    if scope.host is not None and health.checks.get("broker") == "ok":
        workers = {n: m for n, m in workers.items() if n.endswith(f"@{scope.host}")}
        health.checks["workers"] = sorted(workers)
        if not workers:
            health.problems.append(f"workers: none answers on this host ({scope.host})")
    _check_database(settings, health, workers, stall, scope)
    return health


def _check_broker(app: Celery, health: Health) -> dict[str, str]:
    """The broker answers, and which workers answer ping (node name -> model)."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
        replies = app.control.ping(timeout=2.0) or []
    except Exception as error:
        health.checks["broker"] = "unreachable"
        health.problems.append(f"broker: cannot connect ({one_line(error, 200)})")
        return {}
    health.checks["broker"] = "ok"
    workers = {name: name.split(".", 1)[0] for reply in replies for name in reply}
    health.checks["workers"] = sorted(workers)
    return workers


def _check_database(
    settings: Settings, health: Health, workers: dict[str, str], stall: timedelta, scope: Scope
) -> None:
    from db.engine import make_engine, make_sessions
    from db.health import database_now, work_by_model
    from db.migrate import is_current
    from db.registered_models import active_model_id
    from db.restamp import pending_restamp

    engine = make_engine(settings.require_database_url(), pool_size=1)
    try:
        current = is_current(engine)
        health.checks["database"] = "ok"
        health.checks["schema"] = "current" if current else "behind"
        if not current:
            health.problems.append("schema: not up to date (run `listing-vision migrate`)")
            return
        active = active_model_id(engine, settings.model)
        with make_sessions(engine)() as session:
            now = database_now(session)
            work = work_by_model(session)
            restamp = pending_restamp(session)
    except Exception as error:
        health.checks.setdefault("database", "unreachable")
        health.problems.append(f"database: {one_line(error, 200)}")
        return
    finally:
        engine.dispose()
    alive = set(workers.values())
    health.checks["active_model"] = active
    health.checks["restamp"] = "none" if restamp is None else f"pending ({restamp.model_id})"
    if restamp is not None and now - restamp.switched_at >= stall:
        health.problems.append(
            f"restamp: rows of {restamp.model_id} still await their new change_seq "
            f"{(now - restamp.switched_at).total_seconds() / 60:.0f} min after the switch "
            "(beat's watch goes on with it every minute: is beat running?)"
        )
    if scope.model is None and scope.host is not None:
        return  # a process on this host answers: all a probe of beat asks
    held = scope.model or active
    what = "the active model" if scope.model is None else "model"
    if health.checks.get("broker") == "ok" and held not in alive:
        where = "" if scope.host is None else " on this host"
        health.problems.append(f"workers: no live worker{where} holds {what} {held}")
    per_model = {}
    for model in work:
        if scope.model is not None and model.model_id != scope.model:
            continue
        per_model[model.model_id] = {
            "queued": model.queued,
            "running": model.running,
            "last_finished": model.last_finished.isoformat() if model.last_finished else None,
        }
        waiting = model.queued + model.running
        if not waiting or model.oldest_waiting is None:
            continue
        if now - model.oldest_waiting < stall:
            continue
        if model.last_finished is not None and now - model.last_finished < stall:
            continue
        minutes = stall.total_seconds() / 60
        who = "no live worker holds it" if model.model_id not in alive else "its workers answer"
        health.problems.append(
            f"progress: model {model.model_id} has {waiting} jobs waiting and none finished "
            f"in the last {minutes:g} min ({who})"
        )
    health.checks["models"] = per_model
