"""The first schema: listings, images, embeddings, results, jobs, runs, models.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from typing import Any

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

NOW = sa.text("now()")


def _ts(name: str, nullable: bool = False, default: bool = True) -> sa.Column[Any]:
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        nullable=nullable,
        server_default=NOW if default else None,
    )


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table(
        "models",
        sa.Column("model_id", sa.Text, primary_key=True),
        sa.Column("backend", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("pretrained", sa.Text),
        sa.Column("embed_dim", sa.Integer),
        sa.Column("scoring", sa.Text),
        sa.Column("threshold", sa.Float),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.text("false")),
        _ts("registered_at"),
        _ts("loaded_at", nullable=True, default=False),
    )
    op.create_index(
        "models_one_active", "models", ["active"], unique=True, postgresql_where=sa.text("active")
    )
    op.create_table(
        "listings",
        sa.Column("listing_id", sa.Text, primary_key=True),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("category", sa.Text),
        sa.Column("image_urls", JSONB, nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
    )
    op.create_table(
        "images",
        sa.Column("sha256", sa.Text, primary_key=True),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("format", sa.Text, nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("blur", sa.Float, nullable=False),
        sa.Column("brightness", sa.Float, nullable=False),
        _ts("first_seen_at"),
    )
    op.create_table(
        "listing_images",
        sa.Column(
            "listing_id",
            sa.Text,
            sa.ForeignKey("listings.listing_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("sha256", sa.Text, sa.ForeignKey("images.sha256")),
        sa.Column("error", sa.Text),
        _ts("checked_at"),
    )
    op.create_index("listing_images_sha256", "listing_images", ["sha256"])
    op.create_table(
        "embeddings",
        sa.Column("sha256", sa.Text, sa.ForeignKey("images.sha256"), primary_key=True),
        sa.Column("model_id", sa.Text, sa.ForeignKey("models.model_id"), primary_key=True),
        sa.Column("embedding", Vector(), nullable=False),
        _ts("created_at"),
    )
    op.create_table(
        "runs",
        sa.Column("run_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("model_id", sa.Text, sa.ForeignKey("models.model_id"), nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'running'")),
        sa.Column("total", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("done", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("failed", sa.Integer, nullable=False, server_default=sa.text("0")),
        _ts("started_at"),
        _ts("finished_at", nullable=True, default=False),
        sa.CheckConstraint(
            "status IN ('running', 'succeeded', 'failed', 'cancelled')", name="runs_status"
        ),
    )
    op.create_table(
        "jobs",
        sa.Column("job_id", UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "listing_id",
            sa.Text,
            sa.ForeignKey("listings.listing_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("model_id", sa.Text, sa.ForeignKey("models.model_id"), nullable=False),
        sa.Column("run_id", UUID(as_uuid=True), sa.ForeignKey("runs.run_id", ondelete="SET NULL")),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'queued'")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("error", sa.Text),
        sa.Column("worker", sa.Text),
        sa.Column("batch_size", sa.Integer),
        _ts("created_at"),
        _ts("sent_at", nullable=True, default=False),
        _ts("started_at", nullable=True, default=False),
        _ts("finished_at", nullable=True, default=False),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'dead')", name="jobs_status"
        ),
    )
    op.create_index("jobs_listing", "jobs", ["listing_id"])
    op.create_index("jobs_status_created", "jobs", ["status", "created_at"])
    op.create_index("jobs_run", "jobs", ["run_id"])
    op.create_table(
        "results",
        sa.Column(
            "listing_id",
            sa.Text,
            sa.ForeignKey("listings.listing_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("model_id", sa.Text, sa.ForeignKey("models.model_id"), primary_key=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("similarity", sa.Float),
        sa.Column("is_match", sa.Boolean),
        sa.Column("top_category", sa.Text),
        sa.Column("categories", JSONB),
        sa.Column("category_mismatch", sa.Boolean),
        sa.Column("best_image", sa.Integer),
        sa.Column("images_total", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("images_failed", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("job_id", UUID(as_uuid=True)),
        sa.Column("change_seq", sa.BigInteger, nullable=False),
        _ts("analyzed_at"),
        sa.CheckConstraint("status IN ('ok', 'failed')", name="results_status"),
    )
    op.create_index("results_change_seq", "results", ["change_seq"], unique=True)

    # change_seq: every write takes the next value. The statement-level trigger takes a
    # transaction-scoped advisory lock before any row is touched, so result writers commit in
    # change_seq order and a poller that remembers the last value it saw never skips a row that
    # commits later with a smaller number.
    op.execute("CREATE SEQUENCE listing_results_change_seq")
    op.execute(
        """
        CREATE FUNCTION results_serialize_writers() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock(7526319372016103793);
            RETURN NULL;
        END $$;
        CREATE TRIGGER results_serialize_writers
            BEFORE INSERT OR UPDATE ON results
            FOR EACH STATEMENT EXECUTE FUNCTION results_serialize_writers();

        CREATE FUNCTION results_stamp_change_seq() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock(7526319372016103793);
            NEW.change_seq := nextval('listing_results_change_seq');
            RETURN NEW;
        END $$;
        CREATE TRIGGER results_stamp_change_seq
            BEFORE INSERT OR UPDATE ON results
            FOR EACH ROW EXECUTE FUNCTION results_stamp_change_seq();

        CREATE FUNCTION results_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('listing_results', json_build_object(
                'listing_id', NEW.listing_id,
                'model_id', NEW.model_id,
                'change_seq', NEW.change_seq)::text);
            RETURN NULL;
        END $$;
        CREATE TRIGGER results_notify
            AFTER INSERT OR UPDATE ON results
            FOR EACH ROW EXECUTE FUNCTION results_notify();
        """
    )
    op.execute(
        """
        CREATE VIEW listing_results AS
        SELECT r.listing_id, r.model_id, r.status, r.error, r.similarity, r.is_match,
               r.top_category, r.categories, r.category_mismatch, r.best_image,
               r.images_total, r.images_failed, r.change_seq, r.analyzed_at
        FROM results r
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS listing_results")
    for table in ("results", "jobs", "runs", "embeddings", "listing_images", "images"):
        op.drop_table(table)
    op.drop_table("listings")
    op.drop_table("models")
    op.execute("DROP SEQUENCE IF EXISTS listing_results_change_seq")
    op.execute("DROP FUNCTION IF EXISTS results_serialize_writers()")
    op.execute("DROP FUNCTION IF EXISTS results_stamp_change_seq()")
    op.execute("DROP FUNCTION IF EXISTS results_notify()")
