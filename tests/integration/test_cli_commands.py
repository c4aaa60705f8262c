"""SPEC.md's command line as an operator meets it: exit codes, refused lines, bad settings,
`models`, `results --since` (real processes on the session's stack)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from db.registered_models import active_model_id
from tests import images
from tests.integration.conftest import Stack, WorkerProcess

pytestmark = pytest.mark.slow


def cli(
    env: dict[str, str], *argv: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "listing_vision", *argv],
        env={**env, "COLUMNS": "200"},
        input=stdin,
        capture_output=True,
        timeout=180,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def test_enqueue_queues_the_valid_lines_refuses_the_rest_and_exits_2(
    worker: WorkerProcess, worker_env: dict[str, str], image_root: Path, stack: Stack
) -> None:
    image = images.save(images.product_image("teal"), image_root / "cli-enqueue.jpg")
    good = {"listing_id": "cli-good-1", "title": "  a teal mug  ", "image_url": image.as_uri()}
    lines = [
        json.dumps(good).encode(),
        b'{"listing_id": "cli-bad", "title": "caf\xe9", "image_url": "x"}',  # Latin-1, not UTF-8
        json.dumps({**good, "listing_id": "cli-long", "category": "c" * 201}).encode(),
        b"not json",
        json.dumps({**good, "listing_id": "cli-good-2"}).encode(),
    ]
    path = image_root / "cli-events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    shown = cli(worker_env, "enqueue", str(path), "--wait", "--timeout", "120")

    assert shown.returncode == 2, shown.stderr
    assert "queued 2 listing(s) for model tiny" in shown.stderr
    assert "line 2" in shown.stderr and "not UTF-8" in shown.stderr
    assert "line 3 (cli-long)" in shown.stderr and "category" in shown.stderr
    assert "line 4" in shown.stderr and "not valid JSON" in shown.stderr
    with stack.engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT listing_id, title, status FROM listings JOIN results USING (listing_id) "
                "WHERE listing_id LIKE 'cli-%' AND model_id = 'tiny' ORDER BY listing_id"
            )
        ).all()
    assert [(r.listing_id, r.title, r.status) for r in rows] == [
        ("cli-good-1", "a teal mug", "ok"),  # surrounding whitespace stripped
        ("cli-good-2", "a teal mug", "ok"),
    ]


def test_enqueue_of_a_file_it_cannot_read_is_bad_usage(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    shown = cli(worker_env, "enqueue", str(tmp_path / "missing.jsonl"))

    assert shown.returncode == 2
    assert "cannot read" in shown.stderr and "missing.jsonl" in shown.stderr
    assert "Traceback" not in shown.stderr


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("LV_MODEL", "tiny-typo", "invalid setting LV_MODEL: unknown model 'tiny-typo'"),
        ("LV_DATABASE_URL", "notaurl", "invalid setting LV_DATABASE_URL: must be a PostgreSQL URL"),
        ("LV_BROKER_URL", "amqp://x//", "invalid setting LV_BROKER_URL: must be a Redis URL"),
    ],
)
def test_a_bad_setting_is_exit_2_naming_it(
    worker_env: dict[str, str], tmp_path: Path, variable: str, value: str, named: str
) -> None:
    events = tmp_path / "one.jsonl"
    events.write_text(json.dumps({"listing_id": "x", "title": "t", "image_url": "x"}) + "\n")

    for argv in (("models",), ("enqueue", str(events)), ("worker", "--model", "tiny")):
        shown = cli({**worker_env, variable: value}, *argv)
        assert shown.returncode == 2, (argv, shown.stderr)
        assert named in " ".join(shown.stderr.split()), (argv, shown.stderr)
        assert "Traceback" not in shown.stderr


def test_models_lists_the_registry_and_marks_the_active_model(
    worker_env: dict[str, str], stack: Stack
) -> None:
    shown = cli(worker_env, "models")

    assert shown.returncode == 0, shown.stderr
    active = active_model_id(stack.engine, "tiny")
    marked = [line for line in shown.stdout.splitlines() if line.count("│") > 2]
    flags = {cells[2].strip(): cells[1].strip() for cells in (m.split("│") for m in marked)}
    assert flags[active] == "*"
    assert {"tiny", "clip-vit-b32", "lv-toy"} <= set(flags)
    assert [model for model, flag in flags.items() if flag == "*"] == [active]


def test_results_since_prints_only_newer_rows_oldest_first(
    worker: WorkerProcess, worker_env: dict[str, str], image_root: Path, stack: Stack
) -> None:
    image = images.save(images.product_image("gold"), image_root / "cli-since.jpg")
    path = image_root / "cli-since.jsonl"
    path.write_text(
        "".join(
            json.dumps({"listing_id": f"since-{i}", "title": "gold", "image_url": image.as_uri()})
            + "\n"
            for i in range(3)
        )
    )
    assert cli(worker_env, "enqueue", str(path), "--wait", "--timeout", "120").returncode == 0
    with stack.engine.connect() as connection:
        seqs = dict(
            connection.execute(
                text("SELECT listing_id, change_seq FROM results WHERE listing_id LIKE 'since-%'")
            ).all()
        )
    first = min(seqs.values())

    shown = cli(
        worker_env, "results", "--since", str(first), "--format", "jsonl", "--model", "tiny"
    )

    assert shown.returncode == 0, shown.stderr
    rows = [json.loads(line) for line in shown.stdout.splitlines()]
    got = [row["change_seq"] for row in rows]
    assert got == sorted(got) and all(seq > first for seq in got)
    newer = {listing for listing, seq in seqs.items() if seq > first}
    assert newer <= {row["listing_id"] for row in rows}
    assert min(seqs, key=seqs.__getitem__) not in {row["listing_id"] for row in rows}
