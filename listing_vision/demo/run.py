"""`listing-vision demo`: a sample catalogue with planted mismatches, scored end to end.

Runs the real path (embedded servers, a worker process, the producer, PostgreSQL results) and
prints how well mismatches and wrong category claims were caught.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from contract.settings import Settings
from db.engine import make_sessions
from db.results import result_for
from listing_vision.demo.catalogue import PRODUCTS, DemoListing, make_catalogue
from listing_vision.demo.toolkit_tour import labelled_file, run_toolkit_tour
from listing_vision.enqueue_command import wait_with_bar
from listing_vision.supervisor import Child, child_env, stop_children
from producer.enqueue import Producer

console = Console(width=None if sys.stdout.isatty() else 120)


class DemoError(RuntimeError):
    """The demo could not finish (its worker died, or the jobs did not finish in time)."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs: which model, how big a catalogue, drawn with which seed."""

    model_id: str
    count: int
    seed: int
    timeout: float
    report: Path | None  # also write the metrics as JSON here


@dataclass(frozen=True)
class Detection:
    """Precision and recall of one check against the planted truth."""

    precision: float
    recall: float
    true_positives: int
    false_positives: int
    false_negatives: int

    @classmethod
    def of(cls, flagged: list[bool], truth: list[bool]) -> Detection:
        pairs = list(zip(flagged, truth, strict=True))
        tp = sum(f and t for f, t in pairs)
        fp = sum(f and not t for f, t in pairs)
        fn = sum(t and not f for f, t in pairs)
        return cls(tp / max(1, tp + fp), tp / max(1, tp + fn), tp, fp, fn)


@dataclass(frozen=True)
class DemoReport:
    model_id: str
    listings: int
    planted_mismatches: int
    planted_wrong_categories: int
    failed: int
    seconds: float
    mismatch: Detection
    category: Detection


def run_demo(resolved: Settings, options: DemoOptions) -> int:
    """Run the demo on the resolved servers, ending with `calibrate` (dry run) and `compare` on
    the catalogue; exit status 0 when every listing was analysed and both commands ran."""
    home = resolved.home.expanduser().resolve() / "demo"
    images = home / f"catalogue-{options.seed}-{options.count}"
    console.print(f"drawing a sample catalogue of {options.count} listings into {images} ...")
    listings = make_catalogue(images, options.count, seed=options.seed)
    categories = home / "categories.txt"
    categories.write_text("\n".join(PRODUCTS) + "\n")
    env = child_env(
        resolved,
        LV_FILE_ROOTS=str(images),
        LV_CATEGORIES_FILE=str(categories),
        LV_LOG_LEVEL="WARNING",
    )
    worker = Child(
        "demo-worker",
        [sys.executable, "-m", "listing_vision", "worker", "--model", options.model_id],
        env,
        log_path=home / "worker.log",
        restart=False,
    )
    started = time.monotonic()
    worker.start()
    try:
        local = resolved.model_copy(update={"file_roots": (images,)})
        rows = _analyse(local, options, listings, worker)
    finally:
        stop_children([worker], timeout=60)
    report = _report(options.model_id, listings, rows, time.monotonic() - started)
    _print(report, listings, rows)
    if options.report is not None:
        options.report.write_text(json.dumps(asdict(report), indent=2) + "\n")
    if report.failed:
        return 1
    labelled = labelled_file(listings, home / f"labelled-{options.seed}-{options.count}.jsonl")
    toured = run_toolkit_tour(console, env, labelled, options.model_id, options.timeout)
    return 0 if toured else 1


def _analyse(
    local: Settings, options: DemoOptions, listings: list[DemoListing], worker: Child
) -> dict[str, dict[str, Any]]:
    """Queue the catalogue, wait for it (while the worker lives), read back every result."""

    def worker_alive() -> None:
        if worker.process is not None and worker.process.poll() is not None:
            log = worker.log_path.read_text(errors="replace")[-3000:] if worker.log_path else ""
            raise DemoError(f"the demo worker exited ({worker.process.returncode}):\n{log}")

    with Producer(local) as producer:
        report = producer.enqueue([x.event() for x in listings], model=options.model_id)
        counts = wait_with_bar(producer, report, options.timeout, check=worker_alive)
        if counts["queued"] or counts["running"]:
            raise DemoError(f"jobs did not finish within {options.timeout:.0f}s: {dict(counts)}")
        with make_sessions(producer.engine)() as session:
            return {
                x.listing_id: result_for(session, x.listing_id, options.model_id) or {}
                for x in listings
            }


def _report(
    model_id: str, listings: list[DemoListing], rows: dict[str, dict[str, Any]], seconds: float
) -> DemoReport:
    ok = [x for x in listings if rows[x.listing_id].get("status") == "ok"]
    mismatch = Detection.of(
        [not rows[x.listing_id]["is_match"] for x in ok], [x.planted_mismatch for x in ok]
    )
    category = Detection.of(
        [bool(rows[x.listing_id]["category_mismatch"]) for x in ok],
        [x.planted_wrong_category for x in ok],
    )
    return DemoReport(
        model_id=model_id,
        listings=len(listings),
        planted_mismatches=sum(x.planted_mismatch for x in listings),
        planted_wrong_categories=sum(x.planted_wrong_category for x in listings),
        failed=len(listings) - len(ok),
        seconds=round(seconds, 1),
        mismatch=mismatch,
        category=category,
    )


def _print(
    report: DemoReport, listings: list[DemoListing], rows: dict[str, dict[str, Any]]
) -> None:
    console.print(
        f"\n[bold]{report.listings} listings[/bold] analysed by [bold]{report.model_id}[/bold] in "
        f"{report.seconds:.0f}s ({report.failed} failed); {report.planted_mismatches} titles and "
        f"{report.planted_wrong_categories} category claims were planted wrong."
    )
    for name, found in (
        ("title/image mismatch", report.mismatch),
        ("wrong category", report.category),
    ):
        console.print(
            f"  {name:>21}: precision [bold]{found.precision:.2f}[/bold], recall "
            f"[bold]{found.recall:.2f}[/bold] (caught {found.true_positives}, false alarms "
            f"{found.false_positives}, missed {found.false_negatives})"
        )
    table = Table(title="examples")
    for column in ("listing", "title", "photo shows", "similarity", "verdict", "top category"):
        table.add_column(column)
    for listing in _examples(listings, rows):
        row = rows[listing.listing_id]
        flagged = not row["is_match"]
        verdict = ("mismatch" if flagged else "match") + (
            " ✓" if flagged == listing.planted_mismatch else " ✗"
        )
        table.add_row(
            listing.listing_id,
            listing.title,
            f"{listing.shows_colour} {listing.shows_product}",
            f"{row['similarity']:.3f}",
            verdict,
            row["top_category"],
        )
    console.print(table)
    console.print("all rows: listing-vision results --since 0   (✓ agrees with the planted truth)")


def _examples(listings: list[DemoListing], rows: dict[str, dict[str, Any]]) -> list[DemoListing]:
    ok = [x for x in listings if rows[x.listing_id].get("status") == "ok"]
    matches = [x for x in ok if not x.planted_mismatch and rows[x.listing_id]["is_match"]][:3]
    caught = [x for x in ok if x.planted_mismatch and not rows[x.listing_id]["is_match"]][:3]
    wrong = [x for x in ok if x.planted_mismatch == bool(rows[x.listing_id]["is_match"])][:3]
    return matches + caught + wrong
