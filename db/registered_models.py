"""The `models` table (which models jobs name, what their workers learned) and `active_model`
(which one `listing_results` shows)."""

from __future__ import annotations

from sqlalchemy import Engine, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from contract.registry import ModelSpec
from db.schema import ActiveModel, Model


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
        chosen = connection.scalar(
            select(ActiveModel.model_id).where(ActiveModel.chosen_by == "reindex")
        )
    return chosen or default


def record_default_model(session: Session, spec: ModelSpec) -> None:
    """Record `LV_MODEL` as the model `listing_results` shows, unless a reindex chose one.

    Every process that starts with settings records it, so the database knows the active model
    even before any reindex (the view joins on it). The registry entry is recorded first.
    """
    ensure_model(session, spec)
    statement = insert(ActiveModel).values(
        singleton=True, model_id=spec.model_id, chosen_by="setting"
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[ActiveModel.singleton],
            set_={"model_id": statement.excluded.model_id, "switched_at": func.now()},
            where=(ActiveModel.chosen_by == "setting")
            & (ActiveModel.model_id != statement.excluded.model_id),
        )
    )


def switch_active_model(session: Session, model_id: str) -> str | None:
    """Make `model_id` the active model, recorded as a reindex's choice; returns the model it
    replaces. The row is locked, so two switches take turns."""
    current = session.execute(select(ActiveModel).with_for_update()).scalar_one_or_none()
    previous = current.model_id if current is not None else None
    statement = insert(ActiveModel).values(
        singleton=True, model_id=model_id, chosen_by="reindex", previous_model_id=previous
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[ActiveModel.singleton],
            set_={
                "model_id": model_id,
                "chosen_by": "reindex",
                "previous_model_id": previous,
                "switched_at": func.now(),
            },
        )
    )
    return previous


def active_model_row(session: Session) -> ActiveModel | None:
    """The recorded active model, how it was chosen and what it replaced (None before any)."""
    return session.execute(select(ActiveModel)).scalar_one_or_none()


def embed_dim(session: Session, model_id: str) -> int | None:
    """The embedding size a worker recorded for `model_id` (None before any worker loaded it)."""
    return session.scalar(select(Model.embed_dim).where(Model.model_id == model_id))
