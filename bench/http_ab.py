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
    ResultListener,
    measured_run,
    pipeline_worker,
    print_pipeline,
)
from contract.registry import load_registry
from contract.settings import load_settings
from db.engine import make_engine
from db.migrate import upgrade
from listing_vision.embedded import EmbeddedServers

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--old-tree", type=Path, required=True)
    parser.add_argument("--listings", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        models_file = scratch / "models.toml"
        models_file.write_text(REGISTRY)
        home = scratch / "home"
        with EmbeddedServers(home) as urls:
            settings = load_settings(
                home=str(home), models_file=str(models_file), file_roots=str(scratch / "images")
            ).with_servers(urls.database_url, urls.broker_url)
            engine = make_engine(settings.require_database_url())
            upgrade(engine)
            engine.dispose()
            listener = ResultListener(settings.require_database_url())
            bench = Bench(settings, load_registry(models_file), listener, scratch / "images", FULL)
            try:
                for round_ in range(args.rounds):
                    for variant, tree in (("old", args.old_tree), ("new", REPO)):
                        listings = bench.listings(f"ab-{variant}{round_}", args.listings + 8)
                        env = {
                            "PYTHONPATH": str(tree),
                            "LV_ALLOWED_PRIVATE_NETWORKS": "127.0.0.0/8",
                        }
                        with (
                            pipeline_worker(settings, TOY, f"ab-{variant}-{round_}", **env),
                            image_server(bench.images) as port,
                        ):
                            row = measured_run(
                                settings,
                                listener,
                                TOY,
                                listings,
                                image_base=f"http://localhost:{port}",
                            )
                        row.update(variant=variant, tree=str(tree), round=round_)
                        print_pipeline(row, f"{variant} round {round_}")
                        rows.append(row)
            finally:
                listener.close()
    today, device = date.today().isoformat(), device_label()
    result = {"date": today, "device": device, "runs": rows}
    out = RESULTS / f"{today}-http-ab-{device.replace('_', '-')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
