"""The tables, as typed SQLAlchemy models. The view, sequence and triggers live in the migration."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TERMINAL_JOB_STATES = ("succeeded", "failed", "dead")


class Base(DeclarativeBase):
    pass


def table_of(model: type[Base]) -> Table:
    """The Core table of a mapped class: bulk statements on it skip the ORM's per-row work."""
    table = model.__table__
    if not isinstance(table, Table):
        raise TypeError(f"{model.__name__} is not mapped to a table")
    return table


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Model(Base):
    """A model that jobs have named; the worker fills in what it learns when it loads it."""

    __tablename__ = "models"
    model_id: Mapped[str] = mapped_column(Text, primary_key=True)
    backend: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    pretrained: Mapped[str | None] = mapped_column(Text)
    embed_dim: Mapped[int | None] = mapped_column(Integer)
    scoring: Mapped[str | None] = mapped_column(Text)
    threshold: Mapped[float | None] = mapped_column(Float)
    registered_at: Mapped[datetime] = _now()
    loaded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ActiveModel(Base):
    """The one model `listing_results` shows: `LV_MODEL` (chosen_by "setting") until a reindex
    records a choice (chosen_by "reindex"), which then wins over the setting."""

    __tablename__ = "active_model"
    singleton: Mapped[bool] = mapped_column(Boolean, primary_key=True, server_default=text("true"))
    model_id: Mapped[str] = mapped_column(Text, ForeignKey("models.model_id"))
    chosen_by: Mapped[str] = mapped_column(Text)
    previous_model_id: Mapped[str | None] = mapped_column(Text, ForeignKey("models.model_id"))
    switched_at: Mapped[datetime] = _now()
    # A switch's restamp, done in batches after it (db.restamp): the last change_seq before the
    # switch, and how far the batches have come; both NULL when none is pending.
    restamp_through: Mapped[int | None] = mapped_column(BigInteger)
    restamped_after: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (
        CheckConstraint("singleton", name="active_model_one_row"),
        CheckConstraint("chosen_by IN ('setting', 'reindex')", name="active_model_chosen_by"),
    )


class CalibratedThreshold(Base):
    """A threshold `calibrate` derived from labelled listings: model-wide (`category` NULL) or
    for listings claiming one category. A newer calibration of the model retires these rows;
    the rows not retired are what the workers judge by."""

    __tablename__ = "thresholds"
    threshold_id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    calibration_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    model_id: Mapped[str] = mapped_column(Text, ForeignKey("models.model_id"))
    category: Mapped[str | None] = mapped_column(Text)
    threshold: Mapped[float] = mapped_column(Float)
    derived_at: Mapped[datetime] = _now()
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Derived from what: the labelled file, its content, the objective, the listings judged.
    source_file: Mapped[str] = mapped_column(Text)
    source_sha256: Mapped[str] = mapped_column(Text)
    objective: Mapped[str] = mapped_column(Text)
    listings: Mapped[int] = mapped_column(Integer)
    mismatches: Mapped[int] = mapped_column(Integer)
    # Mismatch detection on those listings with the thresholds in force before, and with this.
    threshold_before: Mapped[float | None] = mapped_column(Float)
    precision_before: Mapped[float | None] = mapped_column(Float)
    recall_before: Mapped[float | None] = mapped_column(Float)
    precision_after: Mapped[float] = mapped_column(Float)
    recall_after: Mapped[float] = mapped_column(Float)
    __table_args__ = (
        Index(
            "thresholds_current",
            "model_id",
            text("coalesce(category, '')"),
            unique=True,
            postgresql_where=text("retired_at IS NULL"),
        ),
        Index("thresholds_model_derived", "model_id", "derived_at"),
    )


class Listing(Base):
    """The latest event seen for each listing."""

    __tablename__ = "listings"
    listing_id: Mapped[str] = mapped_column(Text, primary_key=True)
    title: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(Text)
    image_urls: Mapped[list[str]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class Image(Base):
    """One distinct image, by content: what it is, whichever listings use it."""

    __tablename__ = "images"
    sha256: Mapped[str] = mapped_column(Text, primary_key=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(Integer)
    blur: Mapped[float] = mapped_column(Float)
    brightness: Mapped[float] = mapped_column(Float)
    first_seen_at: Mapped[datetime] = _now()


class ListingImage(Base):
    """Where a listing's image came from and what happened when it was last fetched."""

    __tablename__ = "listing_images"
    listing_id: Mapped[str] = mapped_column(
        Text, ForeignKey("listings.listing_id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(Text, ForeignKey("images.sha256"))
    error: Mapped[str | None] = mapped_column(Text)
    checked_at: Mapped[datetime] = _now()
    # Validators from the last fetch, for conditional requests (`rescore --refetch`).
    etag: Mapped[str | None] = mapped_column(Text)
    last_modified: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (Index("listing_images_sha256", "sha256"),)


class Embedding(Base):
    """An image embedding per (image content, model): computed once, reused by every listing."""

    __tablename__ = "embeddings"
    sha256: Mapped[str] = mapped_column(Text, ForeignKey("images.sha256"), primary_key=True)
    model_id: Mapped[str] = mapped_column(Text, ForeignKey("models.model_id"), primary_key=True)
    # No fixed dimension: models differ. HNSW indexes are per model, on a cast (see db.embeddings).
    embedding: Mapped[Any] = mapped_column(Vector())
    created_at: Mapped[datetime] = _now()


class Result(Base):
    """The analysis of one listing by one model; `change_seq` is set by a trigger on every write."""

    __tablename__ = "results"
    listing_id: Mapped[str] = mapped_column(
        Text, ForeignKey("listings.listing_id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[str] = mapped_column(Text, ForeignKey("models.model_id"), primary_key=True)
    status: Mapped[str] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    similarity: Mapped[float | None] = mapped_column(Float)
    is_match: Mapped[bool | None] = mapped_column(Boolean)
    top_category: Mapped[str | None] = mapped_column(Text)
    categories: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    category_mismatch: Mapped[bool | None] = mapped_column(Boolean)
    best_image: Mapped[int | None] = mapped_column(Integer)
    images_total: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    images_failed: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    # The listing version this result was computed from (fencing: older never wins).
    listing_updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # What the similarity was computed from: the scored text's SHA-256 and the usable images'
    # (in position order). The same inputs give the same similarity, so rescoring reuses it.
    text_sha256: Mapped[str | None] = mapped_column(Text)
    image_shas: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    change_seq: Mapped[int] = mapped_column(BigInteger)
    analyzed_at: Mapped[datetime] = _now()
    __table_args__ = (
        CheckConstraint("status IN ('ok', 'failed')", name="results_status"),
        Index("results_change_seq", "change_seq", unique=True),
        # One model's rows in change_seq order: a restamp's batches, model_results' pollers.
        Index("results_model_change_seq", "model_id", "change_seq"),
    )


class Run(Base):
    """A bulk run over the catalogue: a rescoring (nightly) or a reindex (a model change)."""

    __tablename__ = "runs"
    run_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    model_id: Mapped[str] = mapped_column(Text, ForeignKey("models.model_id"))
    status: Mapped[str] = mapped_column(Text, server_default=text("'pending'"))
    scope: Mapped[str] = mapped_column(Text, server_default=text("'all'"))
    refetch: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    recompute: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    chunk_size: Mapped[int] = mapped_column(Integer, server_default=text("64"))
    # reindex: the model that was active when the run started (what a rollback returns to).
    previous_model_id: Mapped[str | None] = mapped_column(Text, ForeignKey("models.model_id"))
    total: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    done: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    failed: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # The producer's keyset position (the last listing_id it recorded in a chunk), and when
    # it had recorded them all.
    cursor: Mapped[str | None] = mapped_column(Text)
    produced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()  # the last progress: a chunk finished or produced
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')",
            name="runs_status",
        ),
        CheckConstraint("kind IN ('rescore', 'reindex')", name="runs_kind"),
        Index(
            "runs_one_active_per_kind",
            "kind",
            unique=True,
            postgresql_where=text("status IN ('pending', 'running')"),
        ),
        Index("runs_started", "started_at"),
    )


class RunChunk(Base):
    """Many listings of a run in one message. `generation` counts the listings' attempts (a
    retry chunk holds an earlier chunk's transient failures), `attempts` this chunk's
    deliveries (one redelivered after its worker died is split in halves)."""

    __tablename__ = "run_chunks"
    chunk_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("runs.run_id", ondelete="CASCADE")
    )
    listing_ids: Mapped[list[str]] = mapped_column(ARRAY(Text))
    generation: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    status: Mapped[str] = mapped_column(Text, server_default=text("'queued'"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    worker: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    done: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    failed: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_at: Mapped[datetime] = _now()
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = _now()
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'split', 'cancelled')",
            name="run_chunks_status",
        ),
        Index(
            "run_chunks_open",
            "run_id",
            "status",
            postgresql_where=text("status IN ('queued', 'running')"),
        ),
    )


class Job(Base):
    """One analysis of one listing by one model, as the broker carries it (job_id = task id)."""

    __tablename__ = "jobs"
    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    listing_id: Mapped[str] = mapped_column(
        Text, ForeignKey("listings.listing_id", ondelete="CASCADE")
    )
    model_id: Mapped[str] = mapped_column(Text, ForeignKey("models.model_id"))
    run_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("runs.run_id", ondelete="SET NULL")
    )
    status: Mapped[str] = mapped_column(Text, server_default=text("'queued'"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(Text)
    batch_size: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _now()
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = _now()
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'dead')", name="jobs_status"
        ),
        Index("jobs_unsent", "model_id", "updated_at", postgresql_where=text("sent_at IS NULL")),
        Index(
            "jobs_queued_sent", "model_id", "sent_at", postgresql_where=text("status = 'queued'")
        ),
        Index("jobs_listing", "listing_id"),
        Index("jobs_status_created", "status", "created_at"),
        Index("jobs_run", "run_id"),
    )
