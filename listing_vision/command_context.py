"""What every command starts from: the app, the consoles, settings (with logging), and an
engine on a database whose schema is current."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from enum import StrEnum

import typer
from rich.console import Console
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from contract.settings import Settings, SettingsError, load_settings
from listing_vision.log_format import configure_logging
from listing_vision.servers import connected

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Check and index the images of an e-commerce catalogue.",
)
# Tables stay readable when piped (rich would otherwise squeeze them to 80 columns).
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True)


def command_settings(*, service: bool = False) -> Settings:
    """Settings, and logging: services log at LV_LOG_LEVEL, one-shot commands only warnings."""
    settings = load_settings()
    level = (
        settings.log_level
        if service
        else max(logging.WARNING, logging.getLevelName(settings.log_level))
    )
    configure_logging(level, settings.log_format)
    for noisy in ("pgserver", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    return settings


def migrated_engine(resolved: Settings) -> Engine:
    """An engine on a database brought up to date first."""
    from db.engine import make_engine
    from db.migrate import upgrade

    engine = make_engine(resolved.require_database_url())
    upgrade(engine)
    return engine


def ready_engine(configured: Settings, resolved: Settings) -> Engine:
    """An engine on a current schema: the embedded database (`configured` names none) is
    migrated on the fly, no set-up; a configured one must have been migrated by
    `listing-vision migrate`."""
    from db.engine import make_engine
    from db.migrate import is_current

    if configured.database_url is None:
        return migrated_engine(resolved)
    engine = make_engine(resolved.require_database_url())
    if not is_current(engine):
        raise SettingsError("the database schema is not up to date: run `listing-vision migrate`")
    return engine


class OutputFormat(StrEnum):
    table = "table"
    jsonl = "jsonl"


@contextlib.contextmanager
def read_database(settings: Settings) -> Iterator[tuple[Engine, Session]]:
    """A session on a current schema, for commands that only read the database."""
    from db.engine import make_sessions

    with connected(settings, broker=False) as resolved:
        engine = ready_engine(settings, resolved)
        try:
            with make_sessions(engine)() as session:
                yield engine, session
        finally:
            engine.dispose()
