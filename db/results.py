"""Writes of finished jobs and reads of `listing_results`, the view the catalogue polls."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.records import JobOutcome, ListingImageRecord
from db.schema import Embedding, Image, Job, ListingImage, Result

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


def record_outcome(session: Session, outcome: JobOutcome) -> None:
    """Write a finished job: images, embeddings, the job's state and, last, its result row.

    Every write is an upsert, so a redelivered job writes the same rows again, never twice.
    The result row goes last because writing it takes the change_seq lock until commit.
    """
    _write_images(session, outcome.listing_id, outcome.images)
    _write_embeddings(session, outcome.model_id, outcome.new_embeddings)
    session.execute(
        update(Job)
        .where(Job.job_id == outcome.job_id)
        .values(
            status=outcome.job_status,
            error=outcome.result.error,
            finished_at=func.now(),
            batch_size=outcome.batch_size,
        )
    )
    values = {
        **asdict(outcome.result),
        "listing_id": outcome.listing_id,
        "model_id": outcome.model_id,
        "job_id": outcome.job_id,
        "analyzed_at": func.now(),
    }
    statement = insert(Result).values(values)
    changes = {k: statement.excluded[k] for k in values if k not in ("listing_id", "model_id")}
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[Result.listing_id, Result.model_id], set_=changes
        )
    )


def _write_images(session: Session, listing_id: str, images: list[ListingImageRecord]) -> None:
    if not images:
        return
    facts = {image.facts.sha256: image.facts for image in images if image.facts is not None}
    if facts:
        session.execute(
            insert(Image).values([asdict(f) for f in facts.values()]).on_conflict_do_nothing()
        )
    statement = insert(ListingImage).values(
        [
            {
                "listing_id": listing_id,
                "position": image.position,
                "url": image.url,
                "sha256": image.facts.sha256 if image.facts else None,
                "error": image.error,
                "checked_at": func.now(),
            }
            for image in images
        ]
    )
    excluded = statement.excluded
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[ListingImage.listing_id, ListingImage.position],
            set_={
                "url": excluded.url,
                "sha256": excluded.sha256,
                "error": excluded.error,
                "checked_at": excluded.checked_at,
            },
        )
    )
    session.execute(
        delete(ListingImage).where(
            ListingImage.listing_id == listing_id, ListingImage.position >= len(images)
        )
    )


def _write_embeddings(session: Session, model_id: str, embeddings: dict[str, list[float]]) -> None:
    if not embeddings:
        return
    rows = [{"sha256": sha, "model_id": model_id, "embedding": v} for sha, v in embeddings.items()]
    session.execute(insert(Embedding).values(rows).on_conflict_do_nothing())


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
