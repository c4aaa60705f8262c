"""The switch's restamp, done in batches after it: how far it has gone, on `active_model`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

`restamp_through`: the last change_seq handed out before the switch (every row of the active
model at or below it is still to get a new value); `restamped_after`: the batches' cursor (rows
at or below it have their new value). Both NULL when no restamp is pending.

The index on `results (model_id, change_seq)` makes each batch an exact range of one model's rows
(with `change_seq` alone, a batch read every other model's rows in its range too). It is built
in the migration's transaction: writes to `results` wait for it (a few seconds a million rows).
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("active_model", sa.Column("restamp_through", sa.BigInteger))
    op.add_column("active_model", sa.Column("restamped_after", sa.BigInteger))
    op.create_index("results_model_change_seq", "results", ["model_id", "change_seq"])


def downgrade() -> None:
    # A restamp still pending is finished at once (the code before this one restamped in the
    # switch's transaction, and knows nothing of a pending one).
    op.execute(
        "UPDATE results r SET change_seq = r.change_seq FROM active_model a "
        "WHERE a.restamp_through IS NOT NULL AND r.model_id = a.model_id "
        "AND r.change_seq > a.restamped_after AND r.change_seq <= a.restamp_through"
    )
    op.drop_index("results_model_change_seq", "results")
    op.drop_column("active_model", "restamped_after")
    op.drop_column("active_model", "restamp_through")
