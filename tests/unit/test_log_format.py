"""Log lines: text with key=value fields, or one JSON object per line (LV_LOG_FORMAT=json)."""

from __future__ import annotations

import json
import logging

from listing_vision.log_format import JsonFormatter, TextFormatter


def record(**fields: object) -> logging.LogRecord:
    made = logging.LogRecord(
        "worker.job_runner", logging.INFO, __file__, 1, "job %s", ("j1",), None
    )
    made.fields = fields
    return made


def test_json_lines_carry_the_message_and_the_fields() -> None:
    line = JsonFormatter().format(record(listing_id="sku-1", outcome="failed", write_ms=2.5))
    entry = json.loads(line)
    assert entry["message"] == "job j1" and entry["level"] == "INFO"
    assert entry["logger"] == "worker.job_runner"
    assert (entry["listing_id"], entry["outcome"], entry["write_ms"]) == ("sku-1", "failed", 2.5)
    assert "\n" not in line


def test_text_lines_append_the_fields() -> None:
    line = TextFormatter().format(record(listing_id="sku-1", outcome="ok"))
    assert line.endswith("INFO worker.job_runner: job j1 listing_id=sku-1 outcome=ok")


def test_up_log_file_gets_the_console_format(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from listing_vision.log_format import configure_logging, log_to_file

    configure_logging("INFO", "json")
    handler = log_to_file(tmp_path / "up.log")
    try:
        logging.getLogger("listing_vision.supervisor").info("started %s", "beat")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        configure_logging("WARNING", "text")
    entry = json.loads((tmp_path / "up.log").read_text())
    assert entry["message"] == "started beat" and entry["logger"] == "listing_vision.supervisor"
