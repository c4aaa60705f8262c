"""The `models` table: which models jobs name, what their workers learned, which one is active."""

from __future__ import annotations

from sqlalchemy import Engine, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from contract.registry import ModelSpec
from db.schema import Model


def ensure_model(session: Session, entry: ModelSpec) -> None:
    """Record a registry entry the first time a job or worker names it (keeps it up to date)."""
    values = {
        "backend": entry.backend,
        "name": entry.name,
        "pretrained": entry.pretrained,
        "threshold": entry.threshold,
    }
    statement = insert(Model).values(model_id=entry.model_id, **values)
    session.execute(statement.on_conflict_do_update(index_elements=[Model.model_id], set_=values))


def record_loaded(session: Session, model_id: str, *, embed_dim: int, scoring: str) -> None:
    """What a worker learned when it loaded the model."""
    session.execute(
        update(Model)
        .where(Model.model_id == model_id)
        .values(embed_dim=embed_dim, scoring=scoring, loaded_at=func.now())
    )


def active_model_id(engine: Engine, default: str) -> str:
    """The model a `reindex` switched to, else `default` (the `LV_MODEL` setting)."""
    with engine.connect() as connection:
        chosen = connection.scalar(select(Model.model_id).where(Model.active))
    return chosen or default


def embed_dim(session: Session, model_id: str) -> int | None:
    """The embedding size a worker recorded for `model_id` (None before any worker loaded it)."""
    return session.scalar(select(Model.embed_dim).where(Model.model_id == model_id))
