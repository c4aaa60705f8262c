"""Fencing and reconciliation: the listing version a result was computed from, job touch time.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A result computed from an older version of its listing never replaces a newer one.
    op.add_column("results", sa.Column("listing_updated_at", sa.DateTime(timezone=True)))
    # When a job last changed state: the reconciler finds jobs nothing is working on.
    op.add_column(
        "jobs",
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")
        ),
    )
    op.create_index(
        "jobs_unsent", "jobs", ["model_id", "updated_at"], postgresql_where=sa.text("sent_at IS NULL")
    )


def downgrade() -> None:
    op.drop_index("jobs_unsent", table_name="jobs")
    op.drop_column("jobs", "updated_at")
    op.drop_column("results", "listing_updated_at")
