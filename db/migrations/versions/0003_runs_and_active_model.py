"""Runs (rescoring, reindexing) and their chunks; the active model; what a result was made from.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, UUID

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

RESULT_COLUMNS = """r.listing_id, r.model_id, r.status, r.error, r.similarity, r.is_match,
               r.top_category, r.categories, r.category_mismatch, r.best_image,
               r.images_total, r.images_failed, r.change_seq, r.analyzed_at"""


def upgrade() -> None:
    # The active model: LV_MODEL (recorded by whoever starts with it) until a reindex records a
    # choice, which then wins; one row.
    op.create_table(
        "active_model",
        sa.Column("singleton", sa.Boolean, primary_key=True, server_default=sa.text("true")),
        sa.Column("model_id", sa.Text, sa.ForeignKey("models.model_id"), nullable=False),
        sa.Column("chosen_by", sa.Text, nullable=False),
        sa.Column("previous_model_id", sa.Text, sa.ForeignKey("models.model_id")),
        sa.Column("switched_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.CheckConstraint("singleton", name="active_model_one_row"),
        sa.CheckConstraint("chosen_by IN ('setting', 'reindex')", name="active_model_chosen_by"),
    )
    op.execute(
        "INSERT INTO active_model (model_id, chosen_by) "
        "SELECT model_id, 'reindex' FROM models WHERE active"
    )
    op.drop_index("models_one_active", table_name="models")
    op.drop_column("models", "active")

    # Runs: what each one covers, how far its producer got, and when it last made progress.
    op.drop_constraint("runs_status", "runs")
    op.alter_column("runs", "status", server_default=sa.text("'pending'"))
    op.create_check_constraint(
        "runs_status", "runs", "status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')"
    )
    op.create_check_constraint("runs_kind", "runs", "kind IN ('rescore', 'reindex')")
    op.add_column("runs", sa.Column("scope", sa.Text, nullable=False, server_default=sa.text("'all'")))
    op.add_column("runs", sa.Column("refetch", sa.Boolean, nullable=False, server_default=sa.text("false")))
    op.add_column("runs", sa.Column("recompute", sa.Boolean, nullable=False, server_default=sa.text("false")))
    op.add_column("runs", sa.Column("chunk_size", sa.Integer, nullable=False, server_default=sa.text("64")))
    op.add_column("runs", sa.Column("previous_model_id", sa.Text, sa.ForeignKey("models.model_id")))
    op.add_column("runs", sa.Column("cursor", sa.Text))
    op.add_column("runs", sa.Column("produced_at", sa.DateTime(timezone=True)))
    op.add_column("runs", sa.Column("error", sa.Text))
    op.add_column(
        "runs",
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    )
    # One active run of each kind: two rescoring runs never overlap, nor two reindexes.
    op.create_index(
        "runs_one_active_per_kind",
        "runs",
        ["kind"],
        unique=True,
        postgresql_where=sa.text("status IN ('pending', 'running')"),
    )
    op.create_index("runs_started", "runs", ["started_at"])

    # A chunk: many listings in one message. `generation` counts the listing-level attempts
    # (a retry chunk holds the listings of an earlier one that failed transiently), `attempts`
    # the deliveries of this chunk (a chunk redelivered after its worker died is split).
    op.create_table(
        "run_chunks",
        sa.Column("chunk_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("run_id", UUID(as_uuid=True), sa.ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
        sa.Column("listing_ids", ARRAY(sa.Text), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False, server_default=sa.text("1")),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'queued'")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("worker", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("done", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("failed", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("sent_at", sa.DateTime(timezone=True)),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'split', 'cancelled')", name="run_chunks_status"
        ),
    )
    op.create_index(
        "run_chunks_open", "run_chunks", ["run_id", "status"],
        postgresql_where=sa.text("status IN ('queued', 'running')"),
    )

    # What a result was computed from: unchanged inputs give the same similarity.
    op.add_column("results", sa.Column("text_sha256", sa.Text))
    op.add_column("results", sa.Column("image_shas", ARRAY(sa.Text)))
    # Validators for conditional requests (`rescore --refetch`).
    op.add_column("listing_images", sa.Column("etag", sa.Text))
    op.add_column("listing_images", sa.Column("last_modified", sa.Text))

    # The catalogue's view shows the active model's rows; `model_results` every model's.
    op.execute("DROP VIEW listing_results")
    op.execute(f"CREATE VIEW model_results AS SELECT {RESULT_COLUMNS} FROM results r")
    op.execute(
        f"CREATE VIEW listing_results AS SELECT {RESULT_COLUMNS} FROM results r "
        "JOIN active_model a ON a.model_id = r.model_id"
    )


def downgrade() -> None:
    op.execute("DROP VIEW listing_results")
    op.execute("DROP VIEW model_results")
    op.execute(f"CREATE VIEW listing_results AS SELECT {RESULT_COLUMNS} FROM results r")
    op.drop_column("listing_images", "last_modified")
    op.drop_column("listing_images", "etag")
    op.drop_column("results", "image_shas")
    op.drop_column("results", "text_sha256")
    op.drop_table("run_chunks")
    op.drop_index("runs_started", table_name="runs")
    op.drop_index("runs_one_active_per_kind", table_name="runs")
    for column in ("updated_at", "error", "produced_at", "cursor", "previous_model_id",
                   "chunk_size", "recompute", "refetch", "scope"):
        op.drop_column("runs", column)
    op.drop_constraint("runs_kind", "runs")
    op.drop_constraint("runs_status", "runs")
    op.execute("UPDATE runs SET status = 'running' WHERE status = 'pending'")
    op.create_check_constraint("runs_status", "runs", "status IN ('running', 'succeeded', 'failed', 'cancelled')")
    op.alter_column("runs", "status", server_default=sa.text("'running'"))
    op.add_column("models", sa.Column("active", sa.Boolean, nullable=False, server_default=sa.text("false")))
    op.execute(
        "UPDATE models SET active = true WHERE model_id = "
        "(SELECT model_id FROM active_model WHERE chosen_by = 'reindex')"
    )
    op.create_index("models_one_active", "models", ["active"], unique=True, postgresql_where=sa.text("active"))
    op.drop_table("active_model")
