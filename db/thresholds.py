"""Calibrated thresholds: recording a calibration (retiring the previous one), reading the
thresholds in force, and listing them with how they were derived."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from db.schema import CalibratedThreshold


@dataclass(frozen=True)
class CalibrationSource:
    """What a calibration was derived from: the labelled file, its content, the objective."""

    source_file: str
    source_sha256: str
    objective: str


@dataclass(frozen=True)
class NewThreshold:
    """One threshold of a calibration (`category` None: the model-wide one) and how mismatch
    detection on its listings went before and after."""

    category: str | None
    threshold: float
    listings: int
    mismatches: int
    threshold_before: float | None
    precision_before: float | None
    recall_before: float | None
    precision_after: float
    recall_after: float


def record_calibration(
    session: Session, model_id: str, source: CalibrationSource, rows: Sequence[NewThreshold]
) -> uuid.UUID:
    """Retire the model's thresholds in force and record these in their place (one calibration,
    one timestamp). The model must be registered (`models`)."""
    retire_thresholds(session, model_id)
    calibration_id = uuid.uuid4()
    session.execute(
        insert(CalibratedThreshold),
        [
            {"calibration_id": calibration_id, "model_id": model_id, **asdict(source), **asdict(r)}
            for r in rows
        ],
    )
    return calibration_id


def retire_thresholds(session: Session, model_id: str) -> int:
    """Stop using the model's recorded thresholds (the registry's applies again); how many."""
    retired = session.execute(
        update(CalibratedThreshold)
        .where(CalibratedThreshold.model_id == model_id, CalibratedThreshold.retired_at.is_(None))
        .values(retired_at=func.now())
    )
    return int(retired.rowcount)  # type: ignore[attr-defined]


def recorded_thresholds(session: Session, model_id: str) -> dict[str | None, float]:
    """The model's thresholds in force, by category (None: model-wide); empty when none."""
    rows = session.execute(
        select(CalibratedThreshold.category, CalibratedThreshold.threshold).where(
            CalibratedThreshold.model_id == model_id, CalibratedThreshold.retired_at.is_(None)
        )
    )
    return {category: threshold for category, threshold in rows}


def list_thresholds(
    session: Session, model_id: str | None = None, *, history: bool = False
) -> list[CalibratedThreshold]:
    """Recorded thresholds (those in force; with `history` the retired ones too), newest
    calibration first, the model-wide threshold before the categories."""
    statement = select(CalibratedThreshold)
    if model_id is not None:
        statement = statement.where(CalibratedThreshold.model_id == model_id)
    if not history:
        statement = statement.where(CalibratedThreshold.retired_at.is_(None))
    statement = statement.order_by(
        CalibratedThreshold.model_id,
        CalibratedThreshold.derived_at.desc(),
        CalibratedThreshold.category.nulls_first(),
    )
    return list(session.scalars(statement))
