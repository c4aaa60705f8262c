"""A dozen listings through the real stack: embedded servers, a real worker, open_clip's math."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from tests import images
from tests.integration.conftest import Stack, WorkerProcess, query, wait_for_index
from tests.integration.reference import OpenClipReference

pytestmark = pytest.mark.slow
LONG_TITLE = ("very long title " * 40)[:500]


@pytest.fixture(scope="module")
def catalogue(image_root: Path, image_server: str) -> dict[str, dict[str, Any]]:
    """Listing events keyed by id, good and bad, with the image files they point at."""
    root = image_root
    images.save(images.product_image("red", "circle"), root / "red.jpg")
    images.save(images.product_image("blue", "square"), root / "blue.png", "PNG")
    images.save(images.product_image("green", "triangle"), root / "green.jpg")
    images.save(images.product_image("gold", "circle"), root / "yellow.jpg")
    images.save(images.product_image("purple", "square"), root / "purple.jpg")
    images.save(images.product_image("teal", "triangle"), root / "teal.webp", "WEBP")
    images.truncated_jpeg(root / "truncated.jpg")
    (root / "text.jpg").write_text("this is not an image at all")
    images.png_claiming_size(root / "bomb.png", 8000, 8000)
    images.noisy_png(root / "big.png", 400)

    def file_url(name: str) -> str:
        return (root / name).as_uri()

    good = {
        "p-red": {"title": "red round mug", "image_urls": [file_url("red.jpg")], "category": "mug"},
        "p-blue": {
            "title": "blue box",
            "description": "a square blue box for storage",
            "image_url": file_url("blue.png"),
        },
        "p-http": {"title": "green lamp", "image_urls": [f"{image_server}/green.jpg"]},
        "p-multi": {
            "title": "purple cushion",
            "image_urls": [file_url("yellow.jpg"), file_url("purple.jpg")],
            "category": "Sofa",
        },
        "p-webp": {"title": "teal tent", "image_urls": [file_url("teal.webp")]},
        "p-long": {
            "title": LONG_TITLE,
            "description": "d" * 5000,
            "image_urls": [file_url("red.jpg")],
        },
        "p-claim": {"title": "odd", "image_urls": [file_url("blue.png")], "category": "spaceship"},
    }
    bad = {
        "p-truncated": ([file_url("truncated.jpg")], "corrupt or truncated"),
        "p-text": ([file_url("text.jpg")], "not an image"),
        "p-bomb": ([file_url("bomb.png")], "Mpx"),
        "p-oversize": ([file_url("big.png")], "larger than"),
        "p-404": ([f"{image_server}/missing.jpg"], "404"),
        "p-private": (["http://10.20.30.40/a.jpg"], "private"),
    }
    events = {key: {"listing_id": key, **event} for key, event in good.items()}
    for key, (urls, expected) in bad.items():
        events[key] = {
            "listing_id": key,
            "title": "broken",
            "image_urls": urls,
            "_expect": expected,
        }
    for event in events.values():
        event["_files"] = [
            root / Path(u).name for u in event.get("image_urls", [event.get("image_url", "")])
        ]
    return events


def _events(catalogue: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if not k.startswith("_")} for e in catalogue.values()]


def _text(event: dict[str, Any]) -> str:
    return (
        f"{event['title']}. {event['description']}" if event.get("description") else event["title"]
    )


def _results(stack: Stack, prefix: str = "p-") -> dict[str, dict[str, Any]]:
    rows = query(stack, "SELECT * FROM listing_results WHERE listing_id LIKE :p", p=f"{prefix}%")
    return {row["listing_id"]: row for row in rows}


@pytest.fixture(scope="module")
def first_run(stack: Stack, worker: WorkerProcess, producer, catalogue):  # type: ignore[no-untyped-def]
    report = producer.enqueue(_events(catalogue), model="tiny")
    assert report.refused == []
    counts = producer.wait(report.job_ids, timeout=180)
    assert sum(counts.values()) == len(catalogue), worker.log()[-3000:]
    assert counts["queued"] == counts["running"] == 0, (counts, worker.log()[-3000:])
    return _results(stack)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> OpenClipReference:
    return OpenClipReference.load(model_dir)


def test_every_listing_has_exactly_one_result_row(first_run, catalogue) -> None:  # type: ignore[no-untyped-def]
    assert set(first_run) == set(catalogue)


def test_similarity_equals_open_clip_cosine(first_run, catalogue, reference) -> None:  # type: ignore[no-untyped-def]
    for key, event in catalogue.items():
        if "_expect" in event:
            continue
        row = first_run[key]
        assert row["status"] == "ok", (key, row["error"])
        expected = max(reference.similarity(path, _text(event)) for path in event["_files"])
        assert row["similarity"] == pytest.approx(expected, abs=1e-3), key
        assert row["is_match"] == (row["similarity"] >= 0.1)


def test_best_image_of_a_multi_image_listing_decides_similarity(
    first_run, catalogue, reference
) -> None:  # type: ignore[no-untyped-def]
    event = catalogue["p-multi"]
    scores = [reference.similarity(path, _text(event)) for path in event["_files"]]
    row = first_run["p-multi"]
    assert row["best_image"] == scores.index(max(scores))
    assert row["images_total"] == 2 and row["images_failed"] == 0


def test_zero_shot_categories_match_open_clip_with_template_ensemble(
    first_run, catalogue, reference
) -> None:  # type: ignore[no-untyped-def]
    for key in ("p-red", "p-blue", "p-webp", "p-claim"):
        event = catalogue[key]
        path, claim = event["_files"][0], event.get("category")
        expected = reference.categories(path)
        row = first_run[key]
        assert [c["label"] for c in row["categories"]] == [label for label, _ in expected[:5]]
        for got, (_, score) in zip(row["categories"], expected[:5], strict=True):
            assert got["score"] == pytest.approx(score, abs=1e-3)
        assert row["top_category"] == expected[0][0]
        # A claim is judged by its rank among the list (plus itself when it is not listed).
        judged = [label for label, _ in reference.categories(path, claim)[:3]]
        assert row["category_mismatch"] == (None if claim is None else claim.lower() not in judged)


def test_bad_inputs_fail_with_readable_errors(stack: Stack, first_run, catalogue) -> None:  # type: ignore[no-untyped-def]
    for key, event in catalogue.items():
        if "_expect" not in event:
            continue
        row = first_run[key]
        assert row["status"] == "failed", key
        assert event["_expect"] in row["error"], (key, row["error"])
        assert "\n" not in row["error"] and "Traceback" not in row["error"]
    states = query(stack, "SELECT listing_id, status FROM jobs WHERE listing_id LIKE 'p-%'")
    assert {r["listing_id"] for r in states if r["status"] == "failed"} == {
        k for k, e in catalogue.items() if "_expect" in e
    }


def test_image_facts_and_embeddings_are_stored_once_per_content(
    stack: Stack, first_run, catalogue, reference
) -> None:  # type: ignore[no-untyped-def]
    rows = query(
        stack,
        "SELECT li.listing_id, li.position, i.*, e.embedding::text AS vector "
        "FROM listing_images li JOIN images i USING (sha256) "
        "JOIN embeddings e ON e.sha256 = i.sha256 AND e.model_id = 'tiny' "
        "WHERE li.listing_id = 'p-blue'",
    )
    assert len(rows) == 1
    row = rows[0]
    path = catalogue["p-blue"]["_files"][0]
    assert (row["width"], row["height"], row["format"]) == (96, 80, "PNG")
    assert row["bytes"] == path.stat().st_size
    assert 0.0 < row["brightness"] <= 1.0 and row["blur"] > 0
    stored = json.loads(row["vector"])
    expected = reference.image(path).tolist()
    assert stored == pytest.approx(expected, abs=1e-3)
    # red.jpg is used by two listings and blue.png by two: one embedding row each.
    counts = query(
        stack,
        "SELECT li.sha256, count(DISTINCT li.listing_id) AS listings, "
        "(SELECT count(*) FROM embeddings e WHERE e.sha256 = li.sha256) AS embeddings "
        "FROM listing_images li WHERE li.listing_id LIKE 'p-%' AND li.sha256 IS NOT NULL "
        "GROUP BY li.sha256",
    )
    assert max(c["listings"] for c in counts) == 2
    assert all(c["embeddings"] == 1 for c in counts)


def test_reenqueue_keeps_one_row_per_listing_and_advances_change_seq(
    stack: Stack, producer, first_run, catalogue
) -> None:  # type: ignore[no-untyped-def]
    before = {k: r["change_seq"] for k, r in _results(stack).items()}
    embeddings_before = query(stack, "SELECT count(*) AS n FROM embeddings")[0]["n"]
    events = _events(catalogue)
    changed = next(e for e in events if e["listing_id"] == "p-red")
    changed["title"] = "a completely different title about shoes"
    with psycopg.connect(stack.database_url, autocommit=True) as listener:
        listener.execute("LISTEN listing_results")
        report = producer.enqueue(events, model="tiny")
        counts = producer.wait(report.job_ids, timeout=180)
        notified = {
            json.loads(n.payload)["listing_id"]
            for n in listener.notifies(timeout=5, stop_after=len(events))
        }
    assert counts["queued"] == counts["running"] == 0
    after = _results(stack)
    assert set(after) == set(before)
    assert all(after[k]["change_seq"] > before[k] for k in before)
    assert notified == set(before)
    assert after["p-red"]["similarity"] != pytest.approx(first_run["p-red"]["similarity"], abs=1e-6)
    # Unchanged images are not embedded again.
    assert query(stack, "SELECT count(*) AS n FROM embeddings")[0]["n"] == embeddings_before
    per_listing = query(
        stack,
        "SELECT listing_id, count(*) AS n FROM results WHERE listing_id LIKE 'p-%' GROUP BY 1",
    )
    assert all(row["n"] == 1 for row in per_listing)


def test_similar_finds_the_listing_sharing_an_image_first_and_uses_the_hnsw_index(
    stack: Stack, first_run, worker_env: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from db.embedding_index import index_name
    from db.embeddings import nearest_listings, nearest_sql
    from db.engine import make_sessions

    output = subprocess.run(
        [
            sys.executable,
            "-m",
            "listing_vision",
            "similar",
            "p-red",
            "-k",
            "3",
            "--format",
            "jsonl",
        ],
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [json.loads(line) for line in output.stdout.splitlines()]
    assert len(rows) == 3
    assert rows[0]["listing_id"] == "p-long"  # the same red.jpg
    assert rows[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert "p-red" not in [r["listing_id"] for r in rows]
    assert [r["similarity"] for r in rows] == sorted((r["similarity"] for r in rows), reverse=True)
    wait_for_index(stack.engine, "tiny")
    with make_sessions(stack.engine)() as session:
        session.execute(text("SET LOCAL enable_seqscan = off"))
        plan = (
            session.execute(
                text(f"EXPLAIN {nearest_sql('tiny', 32)}"),
                {"listing_id": "p-red", "fanout": 10, "k": 3},
            )
            .scalars()
            .all()
        )
        assert any(index_name("tiny") in line for line in plan), plan
        assert nearest_listings(session, "p-red", "tiny", 32, 1)[0].listing_id == "p-long"
