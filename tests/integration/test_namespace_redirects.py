"""Redirects to metadata, private and loopback addresses, end to end (issue 14): the whole
stack (PostgreSQL, Valkey, a worker) runs in a network namespace of its own whose loopback
carries 169.254.169.254 and 10.x addresses, each with a listener that must see no request.
Never against the real addresses; skipped, with the reason, where namespaces are not allowed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP = (
    "ip link set lo up && ip addr add 169.254.169.254/32 dev lo && "
    "ip addr add 10.20.30.40/32 dev lo && ip addr add 10.99.0.1/32 dev lo || exit 77; "
    'exec "$0" -m tests.integration.namespace_stack "$1" "$2"'
)


def unshare_command() -> list[str] | str:
    """How to enter a new network namespace here, or why it cannot be done. As root, a plain
    one. Unprivileged, `unshare -rn` would map us to root in a user namespace, where pgserver
    (which runs PostgreSQL as a user of its own when it sees root) is not supported: skipped."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip is not installed"
    if os.geteuid() != 0:
        return "not root: the namespaced stack (pgserver under unshare -rn) is not supported"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"unshare --net is not permitted: {probe.stderr.decode(errors='replace').strip()}"
    return ["unshare", "--net"]


def test_redirects_to_metadata_private_and_loopback_addresses_are_refused_unvisited(
    tmp_path: Path, model_dir: Path
) -> None:
    command = unshare_command()
    if isinstance(command, str):
        pytest.skip(command)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LV_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    home = tmp_path / "ns"
    home.mkdir()
    done = subprocess.run(
        [*command, "sh", "-c", SETUP, sys.executable, str(home), str(model_dir)],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )
    if done.returncode == 77:
        pytest.skip(f"cannot configure the namespace's loopback: {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    rows, seen = report["rows"], report["seen"]

    assert rows["ok.jpg"]["status"] == "ok", rows  # the host itself is reachable: a real test
    for route, kind in [
        ("to-metadata", "link-local"),
        ("to-metadata-decimal", "link-local"),
        ("to-private", "private"),
        ("to-loopback", "loopback"),
        ("to-localhost", "loopback"),
    ]:
        assert rows[route]["status"] == "failed", (route, rows[route])
        assert kind in rows[route]["error"], (route, rows[route]["error"])
    # Refused before connecting: not one request reached a forbidden address.
    assert seen["metadata"] == [] and seen["private"] == [] and seen["loopback"] == [], seen
    assert sorted(seen["host"]) == sorted(
        [
            "/ok.jpg",
            "/to-metadata",
            "/to-metadata-decimal",
            "/to-private",
            "/to-loopback",
            "/to-localhost",
        ]
    )
