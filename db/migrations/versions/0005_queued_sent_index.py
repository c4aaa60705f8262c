"""An index for the reconciler's look at jobs sent long ago and never claimed.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

Without it, each pass scanned every queued job of the model (a deep backlog is exactly when it
runs most often).
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX IF NOT EXISTS jobs_queued_sent ON jobs (model_id, sent_at) "
        "WHERE status = 'queued'"
    )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS jobs_queued_sent")
