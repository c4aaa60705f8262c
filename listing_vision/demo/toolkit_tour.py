"""The demo's last part: `calibrate` and `compare` on the demo catalogue, whose planted truth
makes it a labelled set. The real commands run as child processes on the demo's stack.

`calibrate` runs with `--dry-run`: a tour shows what a calibration would record without
changing the thresholds a user's stack judges by.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from listing_vision.demo.catalogue import DemoListing


def labelled_file(listings: list[DemoListing], path: Path) -> Path:
    """The catalogue as labelled listings: the planted mismatches, what each photo shows."""
    lines = [
        json.dumps(
            {
                **item.event(),
                "label": "mismatch" if item.planted_mismatch else "match",
                "true_category": item.shows_product,
            }
        )
        for item in listings
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_toolkit_tour(
    console: Console, env: dict[str, str], labelled: Path, model_id: str, timeout: float
) -> bool:
    """Calibrate (dry run) and compare the demo model (and `lv-toy`, if another) on the
    labelled catalogue; False when either command failed."""
    env = {**env, "LV_MODEL": model_id}  # the demo's model is the one compared against
    candidates = ",".join(dict.fromkeys([model_id, "lv-toy"]))
    steps = [
        ("calibrate", "--model", model_id, str(labelled), "--dry-run"),
        ("compare", "--models", candidates, str(labelled)),
    ]
    ok = True
    for argv in steps:
        console.print(f"\n[bold]$ listing-vision {' '.join(argv)}[/bold]")
        done = subprocess.run(
            [sys.executable, "-m", "listing_vision", *argv], env=env, timeout=timeout, check=False
        )
        ok = ok and done.returncode == 0
    return ok
