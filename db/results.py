"""Writes of finished jobs and reads of `listing_results`, the view the catalogue polls."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from sqlalchemy import func, or_, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db import jobs
from db.embeddings import insert_embeddings
from db.images import insert_image_facts, write_listing_images
from db.listings import is_superseded
from db.records import JobOutcome
from db.schema import Result

POLL_COLUMNS = (
    "listing_id",
    "model_id",
    "status",
    "error",
    "similarity",
    "is_match",
    "top_category",
    "categories",
    "category_mismatch",
    "best_image",
    "images_total",
    "images_failed",
    "change_seq",
    "analyzed_at",
)


def record_outcome(session: Session, outcome: JobOutcome) -> bool:
    """Write a finished job: its state, images, embeddings and, last, its result row.

    Returns False, writing nothing, when the attempt no longer holds the job (a redelivery
    finished it or took it over). Every write is an upsert, so a repeated write changes nothing.
    A job that analysed an older version of its listing finishes without touching the listing's
    rows. The result row goes last because writing it takes the change_seq lock until commit.
    """
    owned = jobs.finish(
        session,
        outcome.job_id,
        attempt=outcome.attempt,
        status=outcome.job_status,
        error=outcome.result.error,
        batch_size=outcome.batch_size,
    )
    if not owned:
        return False
    # By content: valid whatever happened to the listing since.
    insert_image_facts(session, outcome.images)
    insert_embeddings(session, outcome.model_id, outcome.new_embeddings)
    if is_superseded(session, outcome.listing_id, outcome.listing_updated_at):
        return True  # the newer version's job writes the listing's images and result
    write_listing_images(session, outcome.listing_id, outcome.images)
    values = {
        **asdict(outcome.result),
        "listing_id": outcome.listing_id,
        "model_id": outcome.model_id,
        "job_id": outcome.job_id,
        "listing_updated_at": outcome.listing_updated_at,
        "analyzed_at": func.now(),
    }
    statement = insert(Result).values(values)
    changes = {k: statement.excluded[k] for k in values if k not in ("listing_id", "model_id")}
    newer_or_same = or_(
        Result.listing_updated_at.is_(None),
        statement.excluded.listing_updated_at.is_(None),
        Result.listing_updated_at <= statement.excluded.listing_updated_at,
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[Result.listing_id, Result.model_id], set_=changes, where=newer_or_same
        )
    )
    return True


def poll_results(
    session: Session, *, since: int = 0, limit: int = 1000, model_id: str | None = None
) -> list[dict[str, Any]]:
    """Rows of `listing_results` with `change_seq > since`, oldest change first."""
    where = "change_seq > :since" + (" AND model_id = :model_id" if model_id else "")
    rows = session.execute(
        text(
            f"SELECT {', '.join(POLL_COLUMNS)} FROM listing_results "
            f"WHERE {where} ORDER BY change_seq LIMIT :limit"
        ),
        {"since": since, "limit": limit, "model_id": model_id},
    ).mappings()
    return [dict(row) for row in rows]


def result_for(session: Session, listing_id: str, model_id: str) -> dict[str, Any] | None:
    """The current row of `listing_results` for one (listing, model)."""
    row = (
        session.execute(
            text(
                f"SELECT {', '.join(POLL_COLUMNS)} FROM listing_results "
                "WHERE listing_id = :listing_id AND model_id = :model_id"
            ),
            {"listing_id": listing_id, "model_id": model_id},
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None


def latest_change_seq(session: Session) -> int:
    """The highest change_seq written so far (0 for an empty table)."""
    return int(session.scalar(select(func.coalesce(func.max(Result.change_seq), 0))) or 0)
