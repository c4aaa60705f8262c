"""A read-only role for the catalogue's poller: `listing_vision_reader`.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

NOLOGIN: an administrator grants it to the poller's own login (`GRANT listing_vision_reader TO
catalogue`). It reads the views and the per-job and per-image tables and can write nothing.
Roles are cluster-wide and need CREATEROLE: a migration user without it gets a notice, not a
failed migration (the README shows the statements to run by hand).
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

READABLE = ("listing_results", "model_results", "jobs", "listings", "listing_images", "images")


def upgrade() -> None:
    tables = ", ".join(READABLE)
    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'listing_vision_reader') THEN
                IF NOT EXISTS (
                    SELECT 1 FROM pg_roles
                    WHERE rolname = current_user AND (rolsuper OR rolcreaterole)
                ) THEN
                    RAISE NOTICE 'listing_vision_reader not created: % may not create roles',
                        current_user;
                    RETURN;
                END IF;
                CREATE ROLE listing_vision_reader NOLOGIN;
            END IF;
            EXECUTE format('GRANT USAGE ON SCHEMA %I TO listing_vision_reader', current_schema());
            GRANT SELECT ON {tables} TO listing_vision_reader;
        END
        $$;
        """
    )


def downgrade() -> None:
    tables = ", ".join(READABLE)
    op.execute(
        f"""
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'listing_vision_reader') THEN
                REVOKE SELECT ON {tables} FROM listing_vision_reader;
            END IF;
        END
        $$;
        """
    )
