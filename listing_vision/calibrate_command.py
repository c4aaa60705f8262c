"""`calibrate`: thresholds from the user's labelled listings, recorded in the database.

The labelled listings are scored in this process by the worker's own analysis code
(`toolkit.evaluate`), never queued: they are not catalogue listings. Workers judge by the
recorded thresholds within seconds (`worker.thresholds`); stored results follow at the next
rescoring run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from contract.registry import ModelSpec, get_spec, load_registry
from contract.settings import Settings
from contract.thresholds import Thresholds
from db import registered_models
from db.engine import make_sessions
from db.thresholds import (
    CalibrationSource,
    NewThreshold,
    list_thresholds,
    record_calibration,
    recorded_thresholds,
    retire_thresholds,
)
from listing_vision.command_context import app, command_settings, console, errors, ready_engine
from listing_vision.servers import connected
from listing_vision.toolkit.calibration import (
    DEFAULT_MIN_PER_CATEGORY,
    MIN_PER_LABEL,
    CalibrationError,
    CalibrationPlan,
    GroupResult,
    Judged,
    Objective,
    plan_calibration,
)
from listing_vision.toolkit.labelled import LabelledError, LabelledSet, read_labelled
from listing_vision.toolkit.metrics import Detection
from worker.thresholds import MAX_AGE_S


@app.command()
def calibrate(
    labelled: Annotated[
        Path | None, typer.Argument(help="labelled listings (JSON lines: events plus label)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="the model to calibrate")] = None,
    min_precision: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="the most recall at this precision, not the best F1"),
    ] = None,
    min_per_category: Annotated[
        int, typer.Option(min=1, help="labelled listings a category needs for its own threshold")
    ] = DEFAULT_MIN_PER_CATEGORY,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print, record nothing")] = False,
    show: Annotated[bool, typer.Option("--show", help="list the recorded thresholds")] = False,
    history: Annotated[bool, typer.Option(help="with --show: retired ones too")] = False,
    reset: Annotated[
        bool, typer.Option("--reset", help="retire the model's thresholds (the registry's again)")
    ] = False,
) -> None:
    """Choose a model's thresholds from labelled listings (per claimed category where the labels
    allow), record them, and print precision and recall of mismatch detection before and after."""
    settings = command_settings()
    if show:
        _show(settings, model, history)
        return
    if model is None:
        raise typer.BadParameter("give --model ID (or --show)")
    spec = get_spec(load_registry(settings.models_file), model)
    if reset:
        _reset(settings, spec)
        return
    if labelled is None:
        raise typer.BadParameter("give the labelled listings file (or --show, --reset)")
    try:
        labelled_set = read_labelled(labelled, settings.file_roots)
        _calibrate(
            settings, spec, labelled_set, Objective(min_precision), min_per_category, dry_run
        )
    except (LabelledError, CalibrationError) as error:
        errors.print(f"[red]error:[/red] {error}", markup=True, highlight=False)
        raise typer.Exit(2) from None


def _calibrate(
    settings: Settings,
    spec: ModelSpec,
    labelled: LabelledSet,
    objective: Objective,
    min_per_category: int,
    dry_run: bool,
) -> None:
    from listing_vision.toolkit.evaluate import evaluate  # torch: only when a model runs

    with connected(settings, broker=False) as resolved:
        engine = ready_engine(settings, resolved)
        sessions = make_sessions(engine)
        try:
            with sessions() as session:
                in_force = Thresholds.from_recorded(
                    spec.threshold, recorded_thresholds(session, spec.model_id)
                )
            console.print(
                f"scoring {len(labelled.listings)} labelled listings "
                f"({labelled.mismatches} mismatches) with {spec.model_id} ..."
            )
            evaluation = evaluate(resolved, spec, [i.event.to_record() for i in labelled.listings])
            if not evaluation.has_text:
                raise CalibrationError(f"{spec.model_id} has no text tower: it gives no verdicts")
            judged = [
                Judged(scored.similarity, item.mismatch, item.claimed)
                for item, scored in zip(labelled.listings, evaluation.listings, strict=True)
                if scored.similarity is not None
            ]
            failed = len(labelled.listings) - len(judged)
            if failed:
                console.print(
                    f"{failed} listing(s) could not be scored (their images) and are left out"
                )
            plan = plan_calibration(judged, in_force, objective, min_per_category)
            _print_plan(spec, plan, min_per_category)
            if dry_run:
                console.print("--dry-run: nothing recorded")
                return
            source = CalibrationSource(
                str(labelled.path.resolve()), labelled.sha256, str(objective)
            )
            with sessions.begin() as session:
                registered_models.ensure_model(session, spec)
                calibration_id = record_calibration(
                    session, spec.model_id, source, [_row(plan.model), *map(_row, plan.categories)]
                )
        finally:
            engine.dispose()
    console.print(
        f"recorded calibration {calibration_id}: workers of {spec.model_id} judge by it within "
        f"{MAX_AGE_S:g}s; stored results follow at the next rescoring run "
        "(nightly, or now: listing-vision rescore --all)"
    )


def _row(group: GroupResult) -> NewThreshold:
    before = group.before
    return NewThreshold(
        category=group.category,
        threshold=group.threshold,
        listings=group.listings,
        mismatches=group.mismatches,
        threshold_before=group.threshold_before,
        precision_before=None if before is None else before.precision,
        recall_before=None if before is None else before.recall,
        precision_after=group.after.precision,
        recall_after=group.after.recall,
    )


def _print_plan(spec: ModelSpec, plan: CalibrationPlan, min_per_category: int) -> None:
    table = Table(title=f"{spec.model_id}: mismatch detection ({plan.objective})")
    for column in (
        "thresholds",
        "listings",
        "mismatches",
        "threshold",
        "precision",
        "recall",
        "F1",
    ):
        table.add_column(column, justify="left" if column == "thresholds" else "right")
    for group in (plan.model, *plan.categories):
        name = "all (model-wide)" if group.category is None else f"claimed {group.category}"
        table.add_row(
            name,
            str(group.listings),
            str(group.mismatches),
            _change(group.threshold_before, group.threshold, ".4f"),
            _change(_metric(group.before, "precision"), group.after.precision, ".3f"),
            _change(_metric(group.before, "recall"), group.after.recall, ".3f"),
            _change(_metric(group.before, "f1"), group.after.f1, ".3f"),
        )
    console.print(table)
    if plan.kept_model_wide:
        kept = "; ".join(f"{c}: {why}" for c, why in sorted(plan.kept_model_wide.items()))
        console.print(
            f"judged by the model-wide threshold (a category's own needs {min_per_category} "
            f"labelled listings, at least {MIN_PER_LABEL} matches and {MIN_PER_LABEL} mismatches, "
            f"and must do better on them): {kept}",
            markup=False,
            highlight=False,
        )


def _metric(detection: Detection | None, name: str) -> float | None:
    return None if detection is None else float(getattr(detection, name))


def _change(before: float | None, after: float, spec: str) -> str:
    was = "none" if before is None else format(before, spec)
    return f"{was} -> {format(after, spec)}"


def _show(settings: Settings, model: str | None, history: bool) -> None:
    from listing_vision.command_context import read_database

    with read_database(settings) as (_, session):
        rows = list_thresholds(session, model, history=history)
    if not rows:
        console.print("no calibrated thresholds: every model judges by its registry threshold")
        return
    table = Table()
    columns = ("model", "category", "threshold", "was", "listings", "precision", "recall")
    for column in (*columns, "objective", "derived", "from", *(("retired",) if history else ())):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.model_id,
            row.category or "(model-wide)",
            f"{row.threshold:.4f}",
            "none" if row.threshold_before is None else f"{row.threshold_before:.4f}",
            f"{row.listings} ({row.mismatches} mismatch)",
            _change(row.precision_before, row.precision_after, ".3f"),
            _change(row.recall_before, row.recall_after, ".3f"),
            row.objective,
            f"{row.derived_at:%Y-%m-%d %H:%M}",
            f"{Path(row.source_file).name} sha256:{row.source_sha256[:12]}",
            *((f"{row.retired_at:%Y-%m-%d %H:%M}" if row.retired_at else "",) if history else ()),
        )
    console.print(table)


def _reset(settings: Settings, spec: ModelSpec) -> None:
    with connected(settings, broker=False) as resolved:
        engine = ready_engine(settings, resolved)
        try:
            with make_sessions(engine).begin() as session:
                retired = retire_thresholds(session, spec.model_id)
        finally:
            engine.dispose()
    registry = "no threshold" if spec.threshold is None else f"{spec.threshold:g}"
    console.print(
        f"{retired} threshold(s) retired: {spec.model_id} judges by its registry threshold "
        f"({registry}) again; stored results follow at the next rescoring run"
    )
