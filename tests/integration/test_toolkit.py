"""The model toolkit on the embedded stack: `calibrate` (and `compare`) on labelled listings.

The module has a database and a broker database of its own. Its catalogue and its labelled
listings are drawn toy products (`listing_vision.demo.catalogue`, other seeds than the toy
model was trained and calibrated on), scored by the bundled toy model `lv-toy` under the id
`toy-cal`, whose registry threshold (0.3) is set by hand far too low: nearly nothing is flagged.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from contract.thresholds import Thresholds
from db.engine import make_sessions
from db.thresholds import CalibrationSource, NewThreshold, record_calibration, recorded_thresholds
from listing_vision.demo.catalogue import PRODUCTS, DemoListing, make_catalogue
from producer.enqueue import Producer
from producer.runs import RunProducer
from tests.integration.conftest import (
    Stack,
    WorkerProcess,
    lv_environment,
    own_servers,
    settings_from,
    spawn_worker,
    start_worker,
    stop_worker,
    together,
    wait_for_index,
    wait_ready,
)
from tests.tiny_models import save_tiny_open_clip
from worker.thresholds import RecordedThresholds

pytestmark = pytest.mark.slow

TOY = Path(__file__).parents[2] / "listing_vision" / "demo" / "lv-toy"
HAND_PICKED = 0.3


@dataclass
class Toolkit:
    env: dict[str, str]
    engine: Engine
    tmp: Path
    catalogue: list[DemoListing]
    labelled: Path
    worker: WorkerProcess

    def query(self, sql: str, **params: object) -> list[dict[str, Any]]:
        with make_sessions(self.engine)() as session:
            return [dict(row) for row in session.execute(text(sql), params).mappings()]

    def cli(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "listing_vision", *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def rescore(self) -> dict[str, Any]:
        with Producer(settings_from(self.env)) as producer:
            run_id = RunProducer(producer).start_rescore("toy-cal", scope="all")
        return self.wait_run(run_id)

    def wait_run(self, run_id: uuid.UUID, timeout: float = 180) -> dict[str, Any]:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.query("SELECT * FROM runs WHERE run_id = :r", r=run_id)[0]
            if run["status"] not in ("pending", "running"):
                return run
            time.sleep(0.2)
        pytest.fail(f"run {run_id} not finished after {timeout}s")


def labelled_line(listing: DemoListing) -> str:
    return json.dumps(
        {
            **listing.event(),
            "label": "mismatch" if listing.planted_mismatch else "match",
            "true_category": listing.shows_product,
        }
    )


@pytest.fixture(scope="module")
def toolkit(
    stack: Stack, models_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Toolkit]:
    tmp = tmp_path_factory.mktemp("toolkit")
    own = own_servers(stack, "lv_toolkit", broker_db=6)
    database_url, broker_url, engine = own.database_url, own.broker_url, own.engine
    root = tmp / "images"
    root.mkdir()
    categories = tmp / "categories.txt"
    categories.write_text("\n".join(PRODUCTS) + "\n")
    siglip = tmp / "tiny-siglip"  # saved while the worker starts (it loads toy-cal only)
    registry = tmp / "models.toml"
    registry.write_text(
        models_file.read_text()
        + f'\n[models.toy-cal]\nbackend = "open_clip"\nname = "local-dir:{TOY}"\n'
        + f"threshold = {HAND_PICKED}\n"
        + f'\n[models.tiny-siglip]\nbackend = "open_clip"\nname = "local-dir:{siglip}"\n'
        + "threshold = 0.2\n"
        + f'\n[models.missing]\nbackend = "open_clip"\nname = "local-dir:{tmp / "none"}"\n'
    )
    env = lv_environment(
        stack,
        registry,
        root,
        LV_DATABASE_URL=database_url,
        LV_BROKER_URL=broker_url,
        LV_MODEL="toy-cal",
        LV_CATEGORIES_FILE=str(categories),
        LV_RUN_CHUNK_SIZE="16",
        LV_HOME=str(tmp / "home"),
    )
    worker = spawn_worker(env, tmp / "worker.log", model="toy-cal")
    try:
        # The images and the SigLIP-style model are drawn while the worker starts.
        catalogue = make_catalogue(root / "catalogue", 48, seed=31, size=96)
        labelled = make_catalogue(root / "labelled", 160, seed=32, size=96)
        labelled_path = tmp / "labelled.jsonl"
        labelled_path.write_text("\n".join(labelled_line(item) for item in labelled) + "\n")
        save_tiny_open_clip(siglip, siglip=True, seed=5)
        wait_ready(worker)
        with Producer(settings_from(env)) as producer:
            report = producer.enqueue([item.event() for item in catalogue])
            counts = producer.wait(report.job_ids, timeout=120)
        assert counts["succeeded"] == len(catalogue), counts
        yield Toolkit(env, engine, tmp, catalogue, labelled_path, worker)
    finally:
        stop_worker(worker)
        engine.dispose()


@pytest.fixture(scope="module")
def calibrated(toolkit: Toolkit) -> subprocess.CompletedProcess[str]:
    """`calibrate` run once, while the worker holds the hand-picked threshold."""
    done = toolkit.cli("calibrate", "--model", "toy-cal", str(toolkit.labelled))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def test_calibrate_raises_f1_over_the_registry_threshold_and_records_how(
    toolkit: Toolkit, calibrated: subprocess.CompletedProcess[str]
) -> None:
    sha = hashlib.sha256(toolkit.labelled.read_bytes()).hexdigest()
    (row,) = toolkit.query(
        "SELECT * FROM thresholds WHERE model_id = 'toy-cal' AND category IS NULL "
        "AND source_sha256 = :sha ORDER BY derived_at LIMIT 1",
        sha=sha,
    )
    assert row["source_file"] == str(toolkit.labelled.resolve())
    assert row["objective"] == "f1" and row["listings"] == 160
    assert row["mismatches"] == sum('"mismatch"' in line for line in toolkit.labelled.open())
    assert row["threshold_before"] == HAND_PICKED
    assert row["threshold"] > HAND_PICKED
    before = _f1(row["precision_before"], row["recall_before"])
    after = _f1(row["precision_after"], row["recall_after"])
    assert after > before + 0.1, row
    assert after >= 0.9, row
    assert f"{HAND_PICKED:.4f} -> {row['threshold']:.4f}" in calibrated.stdout
    assert "precision" in calibrated.stdout and "recorded calibration" in calibrated.stdout


def test_is_match_follows_recorded_thresholds_after_a_rescoring_run(
    toolkit: Toolkit, calibrated: subprocess.CompletedProcess[str]
) -> None:
    def rows() -> list[dict[str, Any]]:
        return toolkit.query(
            "SELECT r.listing_id, r.similarity, r.is_match, l.category FROM model_results r "
            "JOIN listings l USING (listing_id) WHERE r.model_id = 'toy-cal' AND r.status = 'ok'"
        )

    def table() -> Thresholds:
        with make_sessions(toolkit.engine)() as session:
            return Thresholds.from_recorded(HAND_PICKED, recorded_thresholds(session, "toy-cal"))

    def follows(found: list[dict[str, Any]], thresholds: Thresholds) -> bool:
        return all(
            r["is_match"] == thresholds.is_match(r["similarity"], r["category"]) for r in found
        )

    current = table()
    assert current.default != HAND_PICKED
    stored = rows()
    assert not follows(stored, current)  # stored rows still carry the hand-picked verdicts
    truth = {item.listing_id: item.planted_mismatch for item in toolkit.catalogue}

    run = toolkit.rescore()
    assert run["status"] == "succeeded" and run["done"] == len(toolkit.catalogue), run
    rescored = rows()
    assert follows(rescored, current)
    assert _catalogue_f1(rescored, truth) > _catalogue_f1(stored, truth) + 0.3
    assert _catalogue_f1(rescored, truth) >= 0.8

    # A threshold of its own for listings claiming "mug": all of them flagged by the next run.
    with make_sessions(toolkit.engine).begin() as session:
        record_calibration(
            session,
            "toy-cal",
            CalibrationSource("by-hand", "0" * 64, "f1"),
            [
                NewThreshold(None, current.default or 0.0, 1, 1, None, None, None, 1.0, 1.0),
                NewThreshold("Mug", 1.01, 1, 1, None, None, None, 1.0, 1.0),
            ],
        )
    run = toolkit.rescore()
    assert run["status"] == "succeeded", run
    found = rows()
    assert follows(found, table())
    mugs = [r for r in found if r["category"] == "mug"]
    assert mugs and not any(r["is_match"] for r in mugs)
    assert any(r["is_match"] for r in found if r["category"] != "mug")


def _catalogue_f1(found: list[dict[str, Any]], truth: dict[str, bool]) -> float:
    flagged = [not r["is_match"] for r in found]
    mismatch = [truth[r["listing_id"]] for r in found]
    tp = sum(f and m for f, m in zip(flagged, mismatch, strict=True))
    precision = tp / max(1, sum(flagged))
    return _f1(precision, tp / max(1, sum(mismatch)))


def test_a_worker_reads_new_thresholds_when_its_table_is_stale_or_on_refresh(
    toolkit: Toolkit,
) -> None:
    sessions = make_sessions(toolkit.engine)
    fresh = RecordedThresholds(sessions, "tiny-batch", 0.1, max_age=0)
    cached = RecordedThresholds(sessions, "tiny-batch", 0.1, max_age=3600)
    assert fresh.current() == cached.current() == Thresholds(0.1)
    with sessions.begin() as session:
        from contract.registry import ModelSpec
        from db.registered_models import ensure_model

        ensure_model(session, ModelSpec("tiny-batch", "open_clip", "x", threshold=0.1))
        record_calibration(
            session,
            "tiny-batch",
            CalibrationSource("f", "0" * 64, "f1"),
            [NewThreshold(None, 0.42, 1, 1, 0.1, 0.0, 0.0, 1.0, 1.0)],
        )
    assert fresh.current() == Thresholds(0.42)
    assert cached.current() == Thresholds(0.1)  # within its max age
    cached.refresh()
    assert cached.current() == Thresholds(0.42)


def test_calibrate_show_lists_and_reset_retires(
    toolkit: Toolkit, calibrated: subprocess.CompletedProcess[str]
) -> None:
    shown, history = together(
        lambda: toolkit.cli("calibrate", "--show"),
        lambda: toolkit.cli("calibrate", "--show", "--history", "--model", "toy-cal"),
    )
    assert shown.returncode == 0, shown.stderr
    assert "toy-cal" in shown.stdout and "(model-wide)" in shown.stdout
    # The labelled file's calibration, in force or (after another test's) retired.
    print(history.stdout)
    assert "labelled.jsonl" in history.stdout and f"{HAND_PICKED:.4f}" in history.stdout

    with make_sessions(toolkit.engine).begin() as session:
        from contract.registry import ModelSpec
        from db.registered_models import ensure_model

        ensure_model(session, ModelSpec("tiny", "open_clip", "x", threshold=0.1))
        record_calibration(
            session,
            "tiny",
            CalibrationSource("f", "0" * 64, "f1"),
            [NewThreshold(None, 0.5, 1, 1, 0.1, 0.0, 0.0, 1.0, 1.0)],
        )
    reset = toolkit.cli("calibrate", "--model", "tiny", "--reset")
    assert reset.returncode == 0, reset.stderr
    assert "1 threshold(s) retired" in reset.stdout and "(0.1)" in reset.stdout
    with make_sessions(toolkit.engine)() as session:
        assert recorded_thresholds(session, "tiny") == {}
    history = toolkit.cli("calibrate", "--show", "--model", "tiny", "--history")
    assert "retired" in history.stdout and "0.5000" in history.stdout
    assert "toy-cal" not in history.stdout


def test_calibrate_refuses_a_bad_labelled_file_naming_the_line(toolkit: Toolkit) -> None:
    bad = toolkit.tmp / "bad.jsonl"
    good = toolkit.labelled.read_text().splitlines()[0]
    bad.write_text(good + "\n" + good.replace('"label": "', '"label": "perhaps-') + "\n")
    done = toolkit.cli("calibrate", "--model", "toy-cal", str(bad))
    assert done.returncode == 2
    assert "line 2" in done.stderr and "label" in done.stderr


def test_compare_ranks_the_model_better_by_construction_first(toolkit: Toolkit) -> None:
    """`toy-cal` (lv-toy, trained on such drawings) against two random tiny models, one of them
    SigLIP-style: the trained model ranks first, on every measure that has a right answer."""
    plot = toolkit.tmp / "compare.png"
    done = toolkit.cli(
        "compare",
        "--models",
        "tiny,toy-cal,tiny-siglip",
        str(toolkit.labelled),
        "--json",
        "--plot",
        str(plot),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    rows = {row["model_id"]: row for row in report["models"]}
    assert report["models"][0]["model_id"] == "toy-cal"
    assert [row["rank"] for row in report["models"]] == [1, 2, 3]
    assert report["active_model"] == "toy-cal" and report["catalogue_images"] == 48
    assert report["labelled"]["listings"] == 160
    toy, tiny, siglip = rows["toy-cal"], rows["tiny"], rows["tiny-siglip"]
    assert toy["roc_auc"] > 0.95 > tiny["roc_auc"]
    assert toy["best"]["f1"] > tiny["best"]["f1"] and toy["best"]["f1"] > siglip["best"]["f1"]
    assert toy["top1"] > 0.8 > tiny["top1"]
    assert toy["top3"] >= toy["top1"]
    assert toy["active"] and toy["spearman_vs_active"] == pytest.approx(1.0)
    assert toy["flipped_vs_active"] == 0.0
    assert -1.0 <= tiny["spearman_vs_active"] < 0.9
    assert 0.0 <= tiny["flipped_vs_active"] <= 1.0
    assert (toy["scoring"], tiny["scoring"], siglip["scoring"]) == ("cosine", "cosine", "sigmoid")
    assert 0.0 < siglip["best"]["threshold"] < 1.0  # its own scale: a probability
    assert tiny["embed_dim"] == 32 and toy["embed_dim"] > 0
    for row in rows.values():
        assert row["error"] is None and row["scored"] == 160 and row["failed"] == 0
        assert row["images_per_s"] > 0 and row["memory_kind"] == "rss"
        assert row["baseline_memory_bytes"] < row["peak_memory_bytes"]
        assert row["reindex_seconds"] == pytest.approx(48 / row["images_per_s"])
        assert row["at_threshold"]["threshold"] == row["threshold"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_adds_the_active_model_and_reports_one_that_cannot_run(toolkit: Toolkit) -> None:
    done = toolkit.cli("compare", "--models", "tiny,missing", str(toolkit.labelled))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout
    assert "toy-cal *" in table  # the active model, added as the baseline
    assert "missing" in table and "error" in table
    assert table.index("toy-cal") < table.index("tiny") < table.index("missing")
    assert "missing could not run" in done.stderr


def _jsonl(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_similar_text_finds_listings_showing_it_through_the_index(toolkit: Toolkit) -> None:
    from collections import Counter

    from db.embedding_index import index_name
    from db.embeddings import nearest_vector_sql

    shown = Counter((item.shows_colour, item.shows_product) for item in toolkit.catalogue)
    colour, product = shown.most_common(1)[0][0]
    found, both = together(
        lambda: toolkit.cli(
            *("similar", "--text", f"{colour} {product}", "--model", "toy-cal"),
            *("-k", "3", "--format", "jsonl"),
        ),
        lambda: toolkit.cli("similar", "demo-0001", "--text", "red mug"),
    )
    rows = _jsonl(found)
    by_id = {item.listing_id: item for item in toolkit.catalogue}
    assert len(rows) == 3
    top = by_id[rows[0]["listing_id"]]
    assert (top.shows_colour, top.shows_product) == (colour, product), rows
    assert rows[0]["similarity"] >= rows[1]["similarity"] >= rows[2]["similarity"]
    wait_for_index(toolkit.engine, "toy-cal")
    with make_sessions(toolkit.engine).begin() as session:
        session.execute(text("SET LOCAL enable_seqscan = off"))
        dim = session.execute(
            text("SELECT embed_dim FROM models WHERE model_id = 'toy-cal'")
        ).scalar_one()
        plan = (
            session.execute(
                text(f"EXPLAIN {nearest_vector_sql('toy-cal', dim)}"),
                {"query": "[" + ",".join(["0.1"] * dim) + "]", "fanout": 10, "k": 3},
            )
            .scalars()
            .all()
        )
    assert any(index_name("toy-cal") in line for line in plan), plan
    assert both.returncode == 2 and "give one of" in both.stderr


def test_similar_models_fuses_the_rankings_of_two_indexed_models(toolkit: Toolkit) -> None:
    log = toolkit.tmp / "tiny.log"
    worker = start_worker(None, toolkit.env, log, model="tiny")  # type: ignore[arg-type]
    try:
        with Producer(settings_from(toolkit.env)) as producer:
            report = producer.enqueue([item.event() for item in toolkit.catalogue], model="tiny")
            counts = producer.wait(report.job_ids, timeout=120)
        assert counts["succeeded"] == len(toolkit.catalogue), counts
    finally:
        stop_worker(worker)
    query = toolkit.catalogue[0].listing_id

    def similar(*argv: str) -> Callable[[], subprocess.CompletedProcess[str]]:
        return lambda: toolkit.cli("similar", query, *argv)

    by_toy, by_tiny, by_both, table = together(
        similar("--model", "toy-cal", "-k", "50", "--format", "jsonl"),
        similar("--model", "tiny", "-k", "50", "--format", "jsonl"),
        similar("--models", "toy-cal,tiny", "-k", "5", "--format", "jsonl"),
        similar("--models", "toy-cal,tiny", "-k", "5"),
    )
    single = {
        "toy-cal": [row["listing_id"] for row in _jsonl(by_toy)],
        "tiny": [row["listing_id"] for row in _jsonl(by_tiny)],
    }
    assert len(single["toy-cal"]) == len(single["tiny"]) == len(toolkit.catalogue) - 1

    def rrf(listing_id: str) -> float:  # worked out here from the two single rankings
        return sum(1 / (60 + ranking.index(listing_id) + 1) for ranking in single.values())

    expected = sorted(single["tiny"], key=lambda i: (-rrf(i), i))[:5]
    fused = _jsonl(by_both)
    assert [row["listing_id"] for row in fused] == expected
    for row in fused:
        assert row["rrf_score"] == pytest.approx(rrf(row["listing_id"]))
        assert row["ranks"]["toy-cal"] == single["toy-cal"].index(row["listing_id"]) + 1
    assert query not in [row["listing_id"] for row in fused]
    assert table.returncode == 0 and "fused (RRF)" in table.stdout


def test_similar_image_finds_a_near_duplicate_first_through_the_fetch_guard(
    toolkit: Toolkit, image_root: Path, image_server: str
) -> None:
    from PIL import Image

    original = toolkit.catalogue[3]
    with Image.open(original.image) as drawn:  # resized and re-encoded: a near-duplicate
        copy = drawn.convert("RGB").resize((88, 88))
    local = toolkit.tmp / "query" / "near-duplicate.jpg"
    local.parent.mkdir(exist_ok=True)
    copy.save(local, quality=75)
    copy.save(image_root / "toolkit-near-duplicate.jpg", quality=75)
    url = f"{image_server}/toolkit-near-duplicate.jpg"
    not_image = toolkit.tmp / "query" / "notes.txt"
    not_image.write_text("not a picture")
    by_file, by_url, guarded, refused = together(
        lambda: toolkit.cli(
            "similar", "--image", str(local), "--model", "toy-cal", "-k", "3", "--format", "jsonl"
        ),
        lambda: toolkit.cli("similar", "--image", url, "-k", "1", "--format", "jsonl"),
        lambda: subprocess.run(
            [sys.executable, "-m", "listing_vision", "similar", "--image", url],
            env={**toolkit.env, "LV_ALLOWED_PRIVATE_NETWORKS": ""},
            capture_output=True,
            text=True,
            timeout=300,
        ),
        lambda: toolkit.cli("similar", "--image", str(not_image)),
    )
    rows = _jsonl(by_file)
    assert rows[0]["listing_id"] == original.listing_id, rows
    assert rows[0]["similarity"] > 0.95
    assert _jsonl(by_url)[0]["listing_id"] == original.listing_id  # the active model: toy-cal
    assert guarded.returncode == 2, guarded.stderr
    assert "127.0.0.1" in guarded.stderr and "error:" in guarded.stderr
    assert refused.returncode == 2 and "image" in refused.stderr, refused.stderr
