"""Hostile input end to end (issue 14): real worker, real database rows. Each listing ends
with one clear row at once, no retry burns its attempts, the worker keeps running; odd but
valid images are scored as the images they display. (The fetcher and the decoder are tested
piece by piece in tests/unit; the redirect to private and metadata addresses runs in a
network namespace of its own, test_namespace_redirects.py.)"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from PIL import Image, ImageOps

from tests import images
from tests.integration.conftest import Stack, WorkerProcess, query
from tests.integration.reference import OpenClipReference
from tests.unit.fetch_servers import serve

pytestmark = pytest.mark.slow

# route on tests/unit/fetch_servers.py's server -> what the row's error must say
HOSTILE = {
    "gzip-bomb": "compressed response (Content-Encoding: gzip, gzip)",
    "drip-headers": "timed out after 5s",  # LV_FETCH_TIMEOUT of the session's worker
    "drip": "timed out after 5s",
    "short-body": "malformed HTTP response",  # lies in its Content-Length
    "huge-headers": "malformed HTTP response",
    "not-http": "malformed HTTP response",
    "status/404": "HTTP 404",
}


def test_hostile_hosts_each_end_one_listing_failed_at_once(
    stack: Stack, worker: WorkerProcess, producer: Any
) -> None:
    tag = uuid.uuid4().hex[:6]
    worker_memory = psutil.Process(worker.process.pid)
    rss_before = worker_memory.memory_info().rss
    with serve() as server:
        events = [
            {
                "listing_id": f"hostile-{tag}-{route.replace('/', '-')}",
                "title": "a mug",
                "image_url": f"{server.base_url}/{route}",
            }
            for route in HOSTILE
        ]
        report = producer.enqueue(events, model="tiny")
        counts = producer.wait(report.job_ids, timeout=120, poll_interval=0.3)
        asked = Counter(seen.path for seen in server.requests)

    assert counts["failed"] == len(HOSTILE), (counts, worker.log()[-3000:])
    assert worker.process.poll() is None  # no hostile reply took the worker down
    # Bounded: the gzip bomb alone would be a 400 MB chunk if its bytes were decoded.
    grown = worker_memory.memory_info().rss - rss_before
    assert grown < 150 * 2**20, f"worker RSS grew {grown / 2**20:.0f} MB"
    for route, says in HOSTILE.items():
        listing_id = f"hostile-{tag}-{route.replace('/', '-')}"
        rows = query(
            stack,
            "SELECT status, error FROM model_results WHERE listing_id = :l AND model_id = 'tiny'",
            l=listing_id,
        )
        assert len(rows) == 1 and rows[0]["status"] == "failed", (route, rows)
        assert says in rows[0]["error"], (route, rows[0]["error"])
        assert "\n" not in rows[0]["error"]
        assert asked[f"/{route}"] == 1, (route, asked)  # fetched once: failed, not retried
    attempts = query(
        stack, "SELECT attempts FROM jobs WHERE job_id = ANY(:ids)", ids=list(report.job_ids)
    )
    assert [a["attempts"] for a in attempts] == [1] * len(HOSTILE)


# --- odd but valid images ---------------------------------------------------------------------


def _product(size: tuple[int, int] = (120, 80)) -> Image.Image:
    image = images.product_image("purple", "triangle", size)
    image.paste((255, 200, 0), (0, 0, size[0] // 4, size[1]))  # a yellow band: orientation shows
    return image


def _kinds(root: Path) -> dict[str, tuple[Path, Image.Image, tuple[int, int], str]]:
    """name -> (file the listing points at, the RGB image it displays, its displayed size,
    its format)."""
    kinds = {}
    cmyk = root / "kind-cmyk.jpg"
    _product().convert("CMYK").save(cmyk, format="JPEG", quality=95)
    kinds["cmyk"] = (cmyk, Image.open(cmyk).convert("RGB"), (120, 80), "JPEG")

    levels = np.tile(np.linspace(0, 65535, 120, dtype=np.uint16), (80, 1))
    gray16 = root / "kind-gray16.png"
    Image.fromarray(levels).save(gray16, format="PNG")
    eight = Image.fromarray((levels.astype(np.uint32) * 255 // 65535).astype(np.uint8), "L")
    kinds["gray16"] = (gray16, eight.convert("RGB"), (120, 80), "PNG")

    palette = _product().quantize(8)
    see_through = palette.getpixel((60, 50))  # the triangle's colour: shown as white
    indexed = root / "kind-palette.png"
    palette.save(indexed, format="PNG", transparency=see_through)
    rgba = Image.open(indexed).convert("RGBA")
    flat = Image.new("RGB", rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba.getchannel("A"))
    kinds["palette"] = (indexed, flat, (120, 80), "PNG")

    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90° clockwise
    rotated = root / "kind-exif.jpg"
    _product().save(rotated, format="JPEG", quality=95, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(rotated)).convert("RGB")
    kinds["exif"] = (rotated, upright, (80, 120), "JPEG")

    frames = [_product(), images.product_image("teal", "circle", (120, 80))]
    animated = root / "kind-animated.gif"
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=80)
    kinds["animated"] = (animated, Image.open(animated).convert("RGB"), (120, 80), "GIF")
    return kinds


def test_cmyk_16_bit_palette_exif_rotated_and_animated_images_are_scored_as_displayed(
    stack: Stack,
    worker: WorkerProcess,
    producer: Any,
    image_root: Path,
    model_dir: Path,
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:6]
    kinds = _kinds(image_root)
    events = [
        {"listing_id": f"kind-{tag}-{name}", "title": "a purple tent", "image_url": path.as_uri()}
        for name, (path, *_rest) in kinds.items()
    ]
    report = producer.enqueue(events, model="tiny")
    counts = producer.wait(report.job_ids, timeout=120, poll_interval=0.3)
    assert counts["succeeded"] == len(kinds), (counts, worker.log()[-3000:])

    reference = OpenClipReference.load(model_dir)
    for name, (_path, displayed, size, image_format) in kinds.items():
        row = query(
            stack,
            "SELECT r.status, r.error, i.width, i.height, i.format, e.embedding::text AS vector "
            "FROM model_results r JOIN listing_images li USING (listing_id) "
            "JOIN images i USING (sha256) "
            "JOIN embeddings e ON e.sha256 = i.sha256 AND e.model_id = 'tiny' "
            "WHERE r.listing_id = :l AND r.model_id = 'tiny'",
            l=f"kind-{tag}-{name}",
        )
        assert len(row) == 1 and row[0]["status"] == "ok", (name, row)
        assert (row[0]["width"], row[0]["height"]) == size, name
        assert row[0]["format"] == image_format, name
        expected = tmp_path / f"{name}.png"  # lossless: the pixels the worker should have seen
        displayed.save(expected, format="PNG")
        stored = json.loads(row[0]["vector"])
        assert stored == pytest.approx(reference.image(expected).tolist(), abs=2e-3), name
