"""The switch's restamp, done in batches after it: how far it has gone, on `active_model`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

`restamp_through`: the last change_seq handed out before the switch (every row of the active
model at or below it is still to get a new value); `restamped_after`: the batches' cursor (rows
at or below it have their new value). Both NULL when no restamp is pending.
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


def downgrade() -> None:
    op.drop_column("active_model", "restamped_after")
    op.drop_column("active_model", "restamp_through")
