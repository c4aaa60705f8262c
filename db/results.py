"""Writes of finished jobs and reads of `listing_results`, the view the catalogue polls."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy import func, or_, text
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


def record_outcomes(session: Session, outcomes: Sequence[JobOutcome]) -> list[bool]:
    """Write finished jobs: their state, images, embeddings and, last, their result rows.

    For each job, False (and nothing written) when its attempt no longer holds the job (a
    redelivery finished it or took it over). Every write is an upsert, so a repeated write
    changes nothing. A job that analysed an older version of its listing finishes without
    touching the listing's rows. Rows are taken in a fixed order (jobs, then content by SHA-256,
    then listings by id) so concurrent writers cannot deadlock, and result rows go last because
    writing them takes the change_seq lock until commit.
    """
    owned = {
        outcome.job_id: jobs.finish(
            session,
            outcome.job_id,
            attempt=outcome.attempt,
            status=outcome.job_status,
            error=outcome.result.error,
            batch_size=outcome.batch_size,
        )
        for outcome in sorted(outcomes, key=lambda o: o.job_id)
    }
    mine = [outcome for outcome in outcomes if owned[outcome.job_id]]
    # By content: valid whatever happened to the listings since.
    insert_image_facts(session, [image for outcome in mine for image in outcome.images])
    vectors: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for outcome in mine:
        vectors[outcome.model_id].update(outcome.new_embeddings)
    for model_id in sorted(vectors):
        insert_embeddings(session, model_id, vectors[model_id])
    current = [
        outcome
        for outcome in sorted(mine, key=lambda o: o.listing_id)
        if not is_superseded(session, outcome.listing_id, outcome.listing_updated_at)
    ]
    for outcome in current:
        write_listing_images(session, outcome.listing_id, outcome.images)
    for outcome in current:
        _upsert_result(session, outcome)
    return [owned[outcome.job_id] for outcome in outcomes]


def _upsert_result(session: Session, outcome: JobOutcome) -> None:
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
