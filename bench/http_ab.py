"""Alternating runs of the pipeline over loopback http: an older tree's worker against this
one's, the same embedded servers and image server.

    git archive 0ea0315 | tar -x -C /tmp/old
    cp db/migrations/versions/0007_*.py /tmp/old/db/migrations/versions/   # one schema for both
    cd /tmp && PYTHONPATH=$REPO python -m bench.http_ab --old-tree /tmp/old [--listings 500]

The 2026-12-02 A/Bs: kept connections (old tree 0ea0315, the defaults, lv-toy), and fetching in
the decode processes (old tree 0b57406, `--decode-processes 1 --pool-fetches --threads-too
--models lv-toy sim-vit-b32 --listings 1000 --rounds 3 --tag pool-fetch`; `--threads-too` adds
this tree with the fetch and decode in the worker's threads, LV_DECODE_PROCESSES=0).

The worker's code comes from PYTHONPATH (ahead of the editable install), so the run is started
outside the repository (a `python -m` child puts its working directory first on the path).
Writes `<date>-<tag>-<device>.json` under bench/results (tag: http-ab).
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


def run_one(
    bench: Bench, model: str, variant: str, tree: Path, round_: int, count: int, **env: str
) -> dict[str, Any]:
    """`count` listings over http through a worker whose code comes from `tree`."""
    listings = bench.listings(f"ab-{model}-{variant}{round_}", count + 8)
    env = {"PYTHONPATH": str(tree), "LV_ALLOWED_PRIVATE_NETWORKS": "127.0.0.0/8", **env}
    with (
        pipeline_worker(bench.settings, model, f"ab-{variant}-{round_}", **env),
        image_server(bench.images) as port,
    ):
        base = f"http://localhost:{port}"
        row = measured_run(bench.settings, bench.listener, model, listings, image_base=base)
    row.update(model=model, variant=variant, tree=str(tree), round=round_, env=env)
    print_pipeline(row, f"{model} {variant} round {round_}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--old-tree", type=Path, required=True)
    parser.add_argument("--listings", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=[TOY], help="registry ids (bench's)")
    parser.add_argument(
        "--decode-processes", help="LV_DECODE_PROCESSES for both trees (with LV_INPUT_PATH=tensor)"
    )
    parser.add_argument(
        "--pool-fetches", action="store_true", help="LV_POOL_FETCHES=true (an old tree ignores it)"
    )
    parser.add_argument(
        "--threads-too", action="store_true", help="and this tree with LV_DECODE_PROCESSES=0"
    )
    parser.add_argument("--tag", default="http-ab", help="the JSON's name: <date>-<tag>-<device>")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()
    env: dict[str, str] = {}
    if args.decode_processes is not None:
        env = {"LV_DECODE_PROCESSES": args.decode_processes, "LV_INPUT_PATH": "tensor"}
    if args.pool_fetches:
        env["LV_POOL_FETCHES"] = "true"
    variants = [("old", args.old_tree, env), ("new", REPO, env)]
    if args.threads_too:
        variants.append(("new-threads", REPO, {**env, "LV_DECODE_PROCESSES": "0"}))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        models_file = scratch / "models.toml"
        models_file.write_text(REGISTRY)
        with bench_stack(scratch, models_file, load_registry(models_file), FULL) as bench:
            for round_ in range(args.rounds):
                for model in args.models:
                    for variant, tree, extra in variants:
                        row = run_one(bench, model, variant, tree, round_, args.listings, **extra)
                        rows.append(row)
    today, device = date.today().isoformat(), device_label()
    result = {"date": today, "device": device, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{today}-{args.tag}-{device.replace('_', '-')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
