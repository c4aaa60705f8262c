"""How runs look in a terminal: the list, one run with its rate and ETA, a live bar."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from db import embedding_index, runs
from db.schema import Run

STALLED_AFTER = 120.0  # seconds without progress before a running run is shown as stalled


@dataclass(frozen=True)
class RunProgress:
    """A run as an operator reads it: its counts, and the rate and ETA derived from them."""

    run_id: uuid.UUID
    kind: str
    model_id: str
    status: str
    total: int
    done: int
    failed: int
    seconds: float  # since it started (until it finished)
    idle: float  # since its last progress
    produced: bool
    error: str | None = None
    index_build: str | None = None  # what a reindex's index build under way is doing

    @classmethod
    def of(
        cls, run: Run, now: datetime | None = None, index_build: str | None = None
    ) -> RunProgress:
        now = now or datetime.now(UTC)
        end = run.finished_at or now
        return cls(
            run.run_id,
            run.kind,
            run.model_id,
            run.status,
            run.total,
            run.done,
            run.failed,
            max(0.0, (end - run.started_at).total_seconds()),
            max(0.0, (now - run.updated_at).total_seconds()),
            run.produced_at is not None,
            run.error,
            index_build,
        )

    @classmethod
    def read(cls, session: Session, run: Run) -> RunProgress:
        """The run's progress, with its index build's when a done reindex is building it
        (its counts stand still meanwhile, and that is not a stall)."""
        done = run.produced_at is not None and run.done + run.failed >= run.total
        building = None
        if run.kind == "reindex" and run.status == "running" and done:
            building = embedding_index.build_progress(session, run.model_id)
        return cls.of(run, index_build=building)

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def rate(self) -> float:
        """Listings per second since the run started."""
        return self.finished / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far (None when unknown or over)."""
        if self.status not in runs.ACTIVE_RUN or self.rate <= 0:
            return None
        return max(0, self.total - self.finished) / self.rate

    @property
    def stalled(self) -> bool:
        return self.status == "running" and self.idle > STALLED_AFTER and not self.index_build

    def line(self) -> str:
        """One line: status, counts, rate, ETA."""
        share = f" ({100 * self.finished / self.total:.0f}%)" if self.total else ""
        parts = [
            f"{self.kind} run {self.run_id} of {self.model_id}: {self.status}",
            f"{self.finished:,} of {self.total:,} listings{share}, {self.failed:,} failed",
            f"{self.rate:,.0f} listings/s",
        ]
        if self.eta is not None:
            parts.append(f"ETA {_duration(self.eta)}")
        if self.index_build:
            parts.append(f"building its HNSW index before the switch ({self.index_build})")
        if self.stalled:
            parts.append(f"no progress for {_duration(self.idle)} (workers re-send its chunks)")
        if not self.produced and self.status in runs.ACTIVE_RUN:
            parts.append("still being produced")
        return "; ".join(parts)


def print_runs(console: Console, session: Session, rows: list[Run]) -> None:
    """The newest runs first, one row each."""
    table = Table()
    for column in ("run", "kind", "model", "status", "done", "failed", "total", "rate", "started"):
        table.add_column(column, no_wrap=True)
    for run in rows:
        progress = RunProgress.read(session, run)
        table.add_row(
            str(run.run_id)[:8],
            run.kind,
            run.model_id,
            run.status + _status_note(progress),
            f"{run.done:,}",
            f"{run.failed:,}",
            f"{run.total:,}",
            f"{progress.rate:,.0f}/s",
            run.started_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


def follow(sessions: sessionmaker[Session], run_id: uuid.UUID, console: Console) -> int:
    """A live bar until the run ends; 0 if it succeeded, else 1."""
    columns = (
        TextColumn("[bold]{task.fields[kind]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("run", total=None, kind="run", detail="")
        while True:
            with sessions() as session:
                run = session.get(Run, run_id)
                if run is None:
                    console.print(f"[red]run {run_id} disappeared")
                    return 1
                progress = RunProgress.read(session, run)
            eta = f", ETA {_duration(progress.eta)}" if progress.eta is not None else ""
            detail = f"failed {run.failed:,}, {progress.rate:,.0f}/s{eta}" + _status_note(progress)
            bar.update(
                task,
                total=run.total or None,
                completed=progress.finished,
                kind=f"{run.kind} {run.model_id}",
                detail=detail,
            )
            if run.status not in runs.ACTIVE_RUN:
                break
            time.sleep(0.5)
    console.print(progress.line())
    if progress.error:
        console.print(f"error: {progress.error}")
    return 0 if progress.status == "succeeded" else 1


def _status_note(progress: RunProgress) -> str:
    if progress.index_build:
        waiting = progress.index_build == embedding_index.WAITING_FOR_ANOTHER_BUILD
        return " (index build waiting)" if waiting else " (building index)"
    return " (stalled)" if progress.stalled else ""


def _duration(seconds: float) -> str:
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
