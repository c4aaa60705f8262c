"""`listing-vision demo` on a bare LV_HOME, offline: real results, and mismatches are caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_catches_planted_mismatches_with_high_precision_and_recall(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LV_")}
    env.update(LV_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "listing_vision", "demo", "--report", str(report_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["failed"] == 0 and report["listings"] == 120
    assert report["planted_mismatches"] >= 20
    assert report["mismatch"]["precision"] >= 0.9, report
    assert report["mismatch"]["recall"] >= 0.9, report
    assert report["category"]["precision"] >= 0.8 and report["category"]["recall"] >= 0.8, report
    assert "precision" in done.stdout and "examples" in done.stdout
    # It ends with the model toolkit on the demo catalogue (its planted truth as labels).
    assert "lv-toy: mismatch detection (f1)" in done.stdout
    assert "--dry-run: nothing recorded" in done.stdout
    assert "120 labelled listings" in done.stdout and "lv-toy *" in done.stdout
