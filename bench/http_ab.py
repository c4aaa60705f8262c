"""Alternating runs of the lv-toy pipeline over loopback http: an older tree's worker against
this one's, the same embedded servers and image server (the 2026-12-02 kept-connections A/B).

    git archive 0ea0315 | tar -x -C /tmp/old
    cp db/migrations/versions/0007_*.py /tmp/old/db/migrations/versions/   # one schema for both
    cd /tmp && PYTHONPATH=$REPO python -m bench.http_ab --old-tree /tmp/old [--listings 500]

The worker's code comes from PYTHONPATH (ahead of the editable install), so the run is started
outside the repository (a `python -m` child puts its working directory first on the path).
Writes `<date>-http-ab-<device>.json` under bench/results.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

from bench.image_server import image_server
from bench.machine import device_label
from bench.throughput import (
    FULL,
    REGISTRY,
    RESULTS,
    TOY,
    Bench,
    bench_stack,
    measured_run,
    pipeline_worker,
    print_pipeline,
)
from contract.registry import load_registry

REPO = Path(__file__).resolve().parents[1]


def run_one(bench: Bench, variant: str, tree: Path, round_: int, count: int) -> dict[str, Any]:
    """`count` listings over http through a worker whose code comes from `tree`."""
    listings = bench.listings(f"ab-{variant}{round_}", count + 8)
    env = {"PYTHONPATH": str(tree), "LV_ALLOWED_PRIVATE_NETWORKS": "127.0.0.0/8"}
    with (
        pipeline_worker(bench.settings, TOY, f"ab-{variant}-{round_}", **env),
        image_server(bench.images) as port,
    ):
        base = f"http://localhost:{port}"
        row = measured_run(bench.settings, bench.listener, TOY, listings, image_base=base)
    row.update(variant=variant, tree=str(tree), round=round_)
    print_pipeline(row, f"{variant} round {round_}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--old-tree", type=Path, required=True)
    parser.add_argument("--listings", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        models_file = scratch / "models.toml"
        models_file.write_text(REGISTRY)
        with bench_stack(scratch, models_file, load_registry(models_file), FULL) as bench:
            for round_ in range(args.rounds):
                for variant, tree in (("old", args.old_tree), ("new", REPO)):
                    rows.append(run_one(bench, variant, tree, round_, args.listings))
    today, device = date.today().isoformat(), device_label()
    result = {"date": today, "device": device, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{today}-http-ab-{device.replace('_', '-')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
