"""`compare`: the model-upgrade report, candidates side by side on the user's labelled listings
against the active model, before a reindex.

Each model runs in a fresh process of its own (spawned), through the worker's analysis code
(`toolkit.evaluate`), one after the other: its peak memory is its own, and one model that cannot
load is reported as such while the others are still compared.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from contract.errors import one_line
from contract.registry import ModelSpec, Registry, get_spec, load_registry
from contract.settings import Settings
from contract.thresholds import Thresholds
from db.engine import make_sessions
from db.listings import catalogue_size
from db.records import ListingRecord
from db.registered_models import active_model_id
from db.thresholds import recorded_thresholds
from listing_vision.command_context import app, command_settings, console, errors, ready_engine
from listing_vision.servers import connected
from listing_vision.toolkit.evaluate import Measured, measured_evaluation
from listing_vision.toolkit.labelled import LabelledError, LabelledSet, read_labelled
from listing_vision.toolkit.metrics import Detection
from listing_vision.toolkit.plot import PlotError, plot_comparison
from listing_vision.toolkit.report import Candidate, ModelReport, as_json, build_reports


@app.command()
def compare(
    labelled: Annotated[Path, typer.Argument(help="labelled listings (JSON lines)")],
    models: Annotated[str, typer.Option(help="candidate model ids, comma-separated")],
    json_output: Annotated[
        bool, typer.Option("--json", help="print JSON instead of a table")
    ] = False,
    plot: Annotated[Path | None, typer.Option(help="also draw the comparison to this PNG")] = None,
) -> None:
    """Compare models on labelled listings: detection at the threshold in force and the best
    one, ROC AUC, category accuracy, agreement with the active model, speed and memory (exit 1
    when a model could not run)."""
    settings = command_settings()
    registry = load_registry(settings.models_file)
    ids = list(dict.fromkeys(m.strip() for m in models.split(",") if m.strip()))
    if not ids:
        raise typer.BadParameter("name at least one model: --models A,B")
    specs = [get_spec(registry, model_id) for model_id in ids]
    try:
        labelled_set = read_labelled(labelled, settings.file_roots)
    except LabelledError as error:
        errors.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(2) from None
    with connected(settings, broker=False) as resolved:
        active, thresholds, images = _database_facts(settings, resolved, registry, ids)
        if active not in ids and active in registry:
            specs.append(get_spec(registry, active))
        records = [item.event.to_record() for item in labelled_set.listings]
        candidates = [_run(resolved, spec, records, thresholds[spec.model_id]) for spec in specs]
    reports = build_reports(candidates, labelled_set.listings, active, images)
    if json_output:
        print(json.dumps(_json(reports, labelled_set, active, images), indent=2, default=str))
    else:
        _print_table(reports, labelled_set, active, images)
    if plot is not None:
        try:
            title = f"{labelled_set.path.name}: {len(labelled_set.listings)} labelled listings"
            written = plot_comparison(reports, plot, title)
        except PlotError as error:
            errors.print(f"[red]error:[/red] {error}", highlight=False)
            raise typer.Exit(2) from None
        errors.print(f"plot written to {written}")
    if any(report.error is not None for report in reports):
        raise typer.Exit(1)  # the report stands, but a model could not be compared


def _database_facts(
    configured: Settings, resolved: Settings, registry: Registry, ids: list[str]
) -> tuple[str, dict[str, tuple[Thresholds, bool]], int]:
    """The active model, each model's thresholds in force (and whether calibrated), and how
    many image URLs the catalogue names."""
    engine = ready_engine(configured, resolved)
    try:
        active = active_model_id(engine, configured.model)
        with make_sessions(engine)() as session:
            found = {}
            for model_id in {*ids, active}:
                recorded = recorded_thresholds(session, model_id)
                spec = registry.get(model_id)
                default = spec.threshold if spec is not None else None
                found[model_id] = (Thresholds.from_recorded(default, recorded), bool(recorded))
            _, images = catalogue_size(session)
    finally:
        engine.dispose()
    return active, found, images


def _run(
    settings: Settings,
    spec: ModelSpec,
    records: list[ListingRecord],
    thresholds: tuple[Thresholds, bool],
) -> Candidate:
    """One model in a fresh process; its failure to run is its row's error."""
    errors.print(f"running {spec.model_id} on {len(records)} labelled listings ...")
    table, calibrated = thresholds
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            measured: Measured = pool.submit(measured_evaluation, settings, spec, records).result()
    except BrokenProcessPool:
        return Candidate(spec.model_id, table, calibrated, None, "its process died")
    except Exception as error:
        errors.print(f"[yellow]{spec.model_id} could not run:[/yellow] {one_line(error)}")
        return Candidate(spec.model_id, table, calibrated, None, one_line(error))
    return Candidate(spec.model_id, table, calibrated, measured)


def _json(
    reports: list[ModelReport], labelled: LabelledSet, active: str, images: int
) -> dict[str, object]:
    return {
        "labelled": {
            "file": str(labelled.path),
            "sha256": labelled.sha256,
            "listings": len(labelled.listings),
            "mismatches": labelled.mismatches,
        },
        "active_model": active,
        "catalogue_images": images,
        "models": [as_json(report, rank) for rank, report in enumerate(reports, start=1)],
    }


def _print_table(
    reports: list[ModelReport], labelled: LabelledSet, active: str, images: int
) -> None:
    table = Table(
        title=f"{len(labelled.listings)} labelled listings ({labelled.mismatches} mismatches); "
        f"active model {active}; catalogue {images:,} images",
        caption="P/R/F1: mismatch detection; ρ and flips against the active model",
    )
    columns = ("#", "model", "scale", "dim", "in force: thr P/R/F1", "best: thr P/R/F1", "AUC")
    for column in (*columns, "top-1/3", "ρ", "flips", "img/s", "peak mem", "reindex"):
        table.add_column(column, overflow="fold")
    for rank, r in enumerate(reports, start=1):
        if r.error is not None:
            table.add_row(str(rank), r.model_id, f"[red]error: {r.error}[/red]")
            continue
        table.add_row(
            str(rank),
            r.model_id + (" *" if r.active else ""),
            r.scoring or "image only",
            str(r.embed_dim),
            _detection(r.at_threshold),
            _detection(r.best),
            _num(r.roc_auc),
            f"{_num(r.top1, '.2f')}/{_num(r.top3, '.2f')}",
            _num(r.spearman_vs_active),
            _num(r.flipped_vs_active, ".1%"),
            _num(r.images_per_s, ",.1f"),
            _memory(r),
            _duration(r.reindex_seconds),
        )
    console.print(table)
    console.print(
        "* the active model; scale sigmoid: SigLIP-style, its thresholds are probabilities; "
        "peak mem (+ above the process before the model loaded)",
        highlight=False,
    )


def _detection(found: Detection | None) -> str:
    if found is None or found.threshold is None:
        return "-"
    return f"{found.threshold:.3f}: {found.precision:.2f}/{found.recall:.2f}/{found.f1:.2f}"


def _num(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _memory(report: ModelReport) -> str:
    if report.peak_memory_bytes is None:
        return "-"
    peak = f"{report.peak_memory_bytes / 2**20:,.0f} MB {report.memory_kind}"
    if report.baseline_memory_bytes is None:
        return peak
    return f"{peak} (+{(report.peak_memory_bytes - report.baseline_memory_bytes) / 2**20:,.0f})"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
