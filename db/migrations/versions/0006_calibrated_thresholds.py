"""Thresholds derived by `listing-vision calibrate` from labelled listings.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

One row per (calibration, category or NULL for the model-wide threshold). A new calibration of a
model retires the rows of the previous one (`retired_at`), which stay as its history; the rows
not retired are the thresholds the workers use.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "thresholds",
        sa.Column("threshold_id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("calibration_id", UUID(as_uuid=True), nullable=False),
        sa.Column("model_id", sa.Text, sa.ForeignKey("models.model_id"), nullable=False),
        sa.Column("category", sa.Text),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("derived_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("retired_at", sa.DateTime(timezone=True)),
        sa.Column("source_file", sa.Text, nullable=False),
        sa.Column("source_sha256", sa.Text, nullable=False),
        sa.Column("objective", sa.Text, nullable=False),
        sa.Column("listings", sa.Integer, nullable=False),
        sa.Column("mismatches", sa.Integer, nullable=False),
        sa.Column("threshold_before", sa.Float),
        sa.Column("precision_before", sa.Float),
        sa.Column("recall_before", sa.Float),
        sa.Column("precision_after", sa.Float, nullable=False),
        sa.Column("recall_after", sa.Float, nullable=False),
    )
    op.create_index(
        "thresholds_current",
        "thresholds",
        ["model_id", sa.text("coalesce(category, '')")],
        unique=True,
        postgresql_where=sa.text("retired_at IS NULL"),
    )
    op.create_index("thresholds_model_derived", "thresholds", ["model_id", "derived_at"])


def downgrade() -> None:
    op.drop_table("thresholds")
