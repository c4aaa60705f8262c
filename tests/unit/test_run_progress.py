"""`run RUN_ID`'s line: counts, rate and ETA from a run's row."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from db.schema import Run
from listing_vision.runs_command import RunProgress

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _run(status: str, done: int, failed: int, total: int, minutes: float) -> Run:
    started = NOW - timedelta(minutes=minutes)
    return Run(
        run_id=uuid.UUID(int=7),
        kind="rescore",
        model_id="tiny",
        status=status,
        total=total,
        done=done,
        failed=failed,
        started_at=started,
        updated_at=NOW - timedelta(seconds=5),
        produced_at=started,
        finished_at=NOW if status == "succeeded" else None,
    )


def test_a_running_run_shows_its_rate_and_the_time_left_at_that_rate() -> None:
    progress = RunProgress.of(_run("running", 550, 50, 1_000, minutes=10), now=NOW)

    line = progress.line()
    assert progress.rate == 1.0  # 600 listings in 600 s
    assert progress.eta == 400.0
    assert "600 of 1,000 listings (60%), 50 failed" in line
    assert "1 listings/s" in line and "ETA 6m40s" in line
    assert "no progress" not in line


def test_a_finished_run_has_no_eta_and_a_stalled_one_says_so() -> None:
    finished = RunProgress.of(_run("succeeded", 1_000, 0, 1_000, minutes=10), now=NOW)
    assert finished.eta is None and "ETA" not in finished.line()

    stalled_run = _run("running", 10, 0, 1_000, minutes=30)
    stalled_run.updated_at = NOW - timedelta(minutes=20)
    stalled = RunProgress.of(stalled_run, now=NOW)
    assert stalled.stalled and "no progress for 20m00s" in stalled.line()
