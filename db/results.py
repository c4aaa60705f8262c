"""Writes of finished jobs and reads of `listing_results`, the view the catalogue polls."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, or_, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db import jobs
from db.embeddings import insert_embeddings
from db.images import insert_image_facts, write_listing_images
from db.listings import superseded
from db.records import JobOutcome, ListingOutcome
from db.schema import Result, table_of

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
    """Write finished jobs: their state, then what their listings' analyses found.

    For each job, False (and nothing written) when its attempt no longer holds the job (a
    redelivery finished it or took it over). Jobs are finished in job_id order, the order every
    multi-job writer locks them in.
    """
    # Two deliveries of one job may finish in one group: only the attempt that holds it writes.
    held = jobs.finish_many(
        session,
        [
            jobs.Finish(
                outcome.job_id,
                outcome.attempt,
                outcome.job_status,
                outcome.listing.result.error,
                outcome.batch_size,
            )
            for outcome in outcomes
        ],
    )
    write_listing_outcomes(session, [o.listing for o in outcomes if (o.job_id, o.attempt) in held])
    return [(outcome.job_id, outcome.attempt) in held for outcome in outcomes]


def write_listing_outcomes(session: Session, outcomes: Sequence[ListingOutcome]) -> set[str]:
    """Write what analyses found, in a few statements whatever their number; returns the ids
    of the listings whose rows were left alone because the listing changed meanwhile.

    Every write is an upsert, so a repeated write changes nothing. Rows are taken in a fixed
    order (content by SHA-256, then listings by id) so concurrent writers cannot deadlock, and
    result rows go last because writing them takes the change_seq lock until commit.
    """
    # By content: valid whatever happened to the listings since.
    insert_image_facts(session, [image for outcome in outcomes for image in outcome.images])
    vectors: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for outcome in outcomes:
        vectors[outcome.model_id].update(outcome.new_embeddings)
    for model_id in sorted(vectors):
        insert_embeddings(session, model_id, vectors[model_id])
    stale = superseded(session, {o.listing_id: o.listing_updated_at for o in outcomes})
    current = [outcome for outcome in outcomes if outcome.listing_id not in stale]
    write_listing_images(session, {o.listing_id: o.images for o in current})
    upsert_results(session, current)
    return stale


def upsert_results(session: Session, outcomes: Sequence[ListingOutcome]) -> None:
    """One statement for every result row; an older listing version never replaces a newer."""
    if not outcomes:
        return
    rows = [
        {
            **vars(outcome.result),
            "listing_id": outcome.listing_id,
            "model_id": outcome.model_id,
            "job_id": outcome.job_id,
            "listing_updated_at": outcome.listing_updated_at,
        }
        for outcome in sorted(outcomes, key=lambda o: (o.listing_id, o.model_id))
    ]
    table = table_of(Result)
    statement = insert(table)
    excluded = statement.excluded
    changes = {k: excluded[k] for k in rows[0] if k not in ("listing_id", "model_id")}
    newer_or_same = or_(
        table.c.listing_updated_at.is_(None),
        excluded.listing_updated_at.is_(None),
        table.c.listing_updated_at <= excluded.listing_updated_at,
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["listing_id", "model_id"],
            set_={**changes, "analyzed_at": func.now()},
            where=newer_or_same,
        ),
        rows,
    )


def poll_results(
    session: Session, *, since: int = 0, limit: int = 1000, model_id: str | None = None
) -> list[dict[str, Any]]:
    """Rows with `change_seq > since`, oldest change first: the active model's, as the
    catalogue polls `listing_results`, or one model's from `model_results`."""
    view, where = "listing_results", "change_seq > :since"
    if model_id is not None:
        view, where = "model_results", "change_seq > :since AND model_id = :model_id"
    rows = session.execute(
        text(
            f"SELECT {', '.join(POLL_COLUMNS)} FROM {view} "
            f"WHERE {where} ORDER BY change_seq LIMIT :limit"
        ),
        {"since": since, "limit": limit, "model_id": model_id},
    ).mappings()
    return [dict(row) for row in rows]


def result_for(session: Session, listing_id: str, model_id: str) -> dict[str, Any] | None:
    """The current row of `model_results` for one (listing, model)."""
    row = (
        session.execute(
            text(
                f"SELECT {', '.join(POLL_COLUMNS)} FROM model_results "
                "WHERE listing_id = :listing_id AND model_id = :model_id"
            ),
            {"listing_id": listing_id, "model_id": model_id},
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None
