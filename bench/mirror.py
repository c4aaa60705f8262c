"""What the Milvus mirror costs (issue 16): a reindex backfill with `lv-toy` without and with
`LV_MILVUS_URI` (milvus-lite), how long after the run Milvus holds every embedding, and the
rate of `listing-vision mirror --all` (pgvector to Milvus, no model).

    python -m bench.mirror [--listings N]

Prints JSON and writes bench/results/<date>-mirror-<device>.json. Not a test: the numbers depend
on the machine (milvus-lite is pure Python, in its own process, on the same cores here).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import psutil

from bench.machine import device_label
from bench.runs import RESULTS, add_listings, draw_images, timed_run, worker
from contract.settings import load_settings
from db.engine import make_engine, make_sessions
from db.migrate import upgrade
from db.milvus import MilvusStore
from db.mirror import catch_up
from listing_vision.embedded import EmbeddedServers
from listing_vision.embedded_milvus import EmbeddedMilvus


def backfill(scratch: Path, images: list[Path], listings: int, mirror: bool) -> dict[str, Any]:
    """A reindex of `listings` listings on a fresh stack; with the mirror, also the lag."""
    home = scratch / ("home-mirror" if mirror else "home-plain")
    milvus_path = scratch / "milvus" / "mirror.db"
    with EmbeddedServers(home) as urls:
        settings = load_settings(
            home=str(home),
            file_roots=str(images[0].parent),
            model="clip-vit-b32",
            milvus_uri=str(milvus_path) if mirror else None,
        ).with_servers(urls.database_url, urls.broker_url)
        engine = make_engine(settings.require_database_url())
        upgrade(engine)
        add_listings(settings, images, 0, listings)
        env = {"LV_MILVUS_URI": str(milvus_path)} if mirror else {}
        with worker(settings, scratch / f"worker-{mirror}.log", **env) as child:
            row = timed_run(settings, lambda r: r.start_reindex("lv-toy"), child)
            if not mirror:
                engine.dispose()
                return row
            ended = time.monotonic()
            with EmbeddedMilvus(milvus_path) as url, MilvusStore(url, timeout=60) as store:
                while store.count("lv-toy") < listings_embedded(engine):
                    time.sleep(0.05)
                row["mirror_lag_after_run_s"] = round(time.monotonic() - ended, 2)
                row["dimension"] = store.dimension("lv-toy")
                started = time.monotonic()
                report = catch_up(make_sessions(engine), store, "lv-toy", rewrite=True)
                seconds = time.monotonic() - started
                row["catch_up_embeddings"] = report.written
                row["catch_up_per_s"] = round(report.written / seconds, 1)
        engine.dispose()
        return row


def listings_embedded(engine: Any) -> int:
    from sqlalchemy import text

    with engine.connect() as connection:
        return int(
            connection.scalar(text("SELECT count(*) FROM embeddings WHERE model_id = 'lv-toy'"))
        )


def main() -> None:
    listings = int(sys.argv[sys.argv.index("--listings") + 1]) if "--listings" in sys.argv else 2000
    device = device_label()
    result: dict[str, Any] = {
        "date": date.today().isoformat(),
        "device": device,
        "cpu_cores": psutil.cpu_count(),
        "listings": listings,
    }
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        images = draw_images(scratch / "images", listings)
        print(f"reindex backfill of {listings:,} listings, no mirror:", flush=True)
        result["reindex_no_mirror"] = backfill(scratch, images, listings, mirror=False)
        print(f"reindex backfill of {listings:,} listings, mirrored to milvus-lite:", flush=True)
        result["reindex_mirrored"] = backfill(scratch, images, listings, mirror=True)
    plain = result["reindex_no_mirror"]["listings_per_s"]
    result["mirrored_to_plain"] = round(result["reindex_mirrored"]["listings_per_s"] / plain, 3)
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    name = f"{result['date']}-mirror-{device.replace(' ', '-').lower()}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
