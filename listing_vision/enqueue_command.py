"""`listing-vision enqueue`: read JSON lines, queue the valid ones, optionally wait with a bar."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from contract.broker import model_queue
from contract.settings import Settings
from db.schema import TERMINAL_JOB_STATES
from producer.enqueue import EnqueueReport, Producer
from producer.events import ListingEvent, Refusal, parse_lines

CHUNK_LINES = 5000
NO_WORKER_HINT_AFTER = 15.0
console = Console(stderr=True)


def enqueue_file(
    settings: Settings,
    path: str,
    *,
    model: str | None,
    wait: bool,
    timeout: float | None,
) -> int:
    """Queue a file's events (the valid ones, even when others are refused); with `wait`, wait
    for them. The exit status is SPEC.md's: 2 if any line was refused, else 1 if any job ended
    failed or dead (or did not finish), else 0."""
    with Producer(settings) as producer:
        spec = producer.resolve_model(model)
        report = EnqueueReport(spec.model_id)
        with _open(path) as stream:
            for events, refused in _chunks(stream, settings):
                queued = producer.enqueue(events, model=spec.model_id)
                report.job_ids += queued.job_ids
                report.refused += refused
        for refusal in report.refused:
            console.print(f"[yellow]refused[/yellow] {refusal}")
        console.print(
            f"queued {len(report.job_ids)} listing(s) for model {spec.model_id} "
            f"(queue {model_queue(spec.model_id)}); refused {len(report.refused)}"
        )
        if not wait or not report.job_ids:
            return 2 if report.refused else 0
        counts = wait_with_bar(producer, report, timeout)
    outcome = _report_outcome(counts, len(report.job_ids))
    return 2 if report.refused else outcome


def _open(path: str) -> IO[bytes] | nullcontext[IO[bytes]]:
    """Bytes: each line is decoded on its own, so one line that is not UTF-8 is refused alone."""
    if path == "-":
        return nullcontext(sys.stdin.buffer)
    return open(path, "rb")


def _chunks(
    stream: IO[bytes], settings: Settings
) -> Iterator[tuple[list[ListingEvent], list[Refusal]]]:
    """Parse in chunks so a huge file is queued progressively, keeping global line numbers."""
    lines: list[str] = []
    undecodable: list[Refusal] = []
    first_line = 1
    for raw in stream:
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            number = first_line + len(lines)
            undecodable.append(
                Refusal(number, None, f"not UTF-8: {error.reason} at byte {error.start}")
            )
            lines.append("")  # keeps the numbering; blank lines are skipped
        if len(lines) >= CHUNK_LINES:
            yield _parsed(lines, settings, first_line, undecodable)
            first_line += len(lines)
            lines, undecodable = [], []
    yield _parsed(lines, settings, first_line, undecodable)


def _parsed(
    lines: list[str], settings: Settings, first_line: int, undecodable: list[Refusal]
) -> tuple[list[ListingEvent], list[Refusal]]:
    events, refused = parse_lines(lines, settings.file_roots, first_line)
    return events, sorted([*refused, *undecodable], key=lambda refusal: refusal.line)


def wait_with_bar(
    producer: Producer,
    report: EnqueueReport,
    timeout: float | None,
    check: Callable[[], None] | None = None,
) -> Counter[str]:
    """Wait for the report's jobs with a progress bar; `check` may raise to stop waiting."""
    total = len(report.job_ids)
    started = time.monotonic()
    hinted = False
    columns = (
        TextColumn("[bold]analysing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("jobs", total=total, detail="")

        def update(counts: Counter[str]) -> None:
            nonlocal hinted
            if check is not None:
                check()
            finished = sum(counts[state] for state in TERMINAL_JOB_STATES)
            detail = f"failed {counts['failed'] + counts['dead']}"
            progress.update(bar, completed=finished, detail=detail)
            idle = counts["queued"] == total and time.monotonic() - started > NO_WORKER_HINT_AFTER
            if idle and not hinted:
                hinted = True
                progress.console.print(
                    f"[yellow]no job has started yet: is a worker running for model "
                    f"{report.model_id}? (listing-vision worker --model {report.model_id})"
                )

        return producer.wait(report.job_ids, timeout=timeout, on_progress=update)


def _report_outcome(counts: Counter[str], total: int) -> int:
    failed = counts["failed"] + counts["dead"]
    unfinished = total - sum(counts[state] for state in TERMINAL_JOB_STATES)
    console.print(
        f"done: {counts['succeeded']} succeeded, {counts['failed']} failed, "
        f"{counts['dead']} dead, {unfinished} unfinished"
    )
    return 1 if failed or unfinished else 0
