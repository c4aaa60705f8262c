"""Log lines as text (people) or one JSON object per line (`LV_LOG_FORMAT=json`, collectors).

Structured fields travel in a record's `fields` extra (a dict): the text form appends them as
`key=value`, the JSON form merges them into the object.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and its `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """The usual line, with a record's `fields` appended as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return line


def configure_logging(level: int | str, log_format: str) -> None:
    """The root logger's one handler (stderr), in the chosen format."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def log_to_file(path: Path) -> logging.FileHandler:
    """Also write the root logger's records to `path` (appended), in the console's format."""
    handler = logging.FileHandler(path, encoding="utf-8")
    root = logging.getLogger()
    console = next((h for h in root.handlers if h.formatter is not None), None)
    handler.setFormatter(console.formatter if console is not None else TextFormatter())
    root.addHandler(handler)
    return handler
