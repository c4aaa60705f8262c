"""Flower is never reachable beyond 127.0.0.1 without complete credentials, and every worker is
named (in Flower, in `celery inspect`) with its model and its GPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from contract.settings import SettingsError, load_settings
from listing_vision.flower import check_exposure, is_loopback


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("LV_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_loopback_needs_no_credentials(address: str) -> None:
    assert is_loopback(address)
    check_exposure(load_settings(), address)


@pytest.mark.parametrize("address", ["0.0.0.0", "", "::", "10.1.2.3", "flower.internal"])
def test_beyond_loopback_is_refused_without_credentials(address: str) -> None:
    with pytest.raises(SettingsError, match="LV_FLOWER_USER and LV_FLOWER_PASSWORD"):
        check_exposure(load_settings(), address)
    check_exposure(load_settings(flower_user="ops", flower_password="pw"), address)


def _flower(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "listing_vision", "flower", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("credentials", "expected"),
    [
        ({}, "would be reachable from other hosts without authentication"),
        ({"LV_FLOWER_USER": "ops"}, "LV_FLOWER_PASSWORD is unset"),
        ({"LV_FLOWER_PASSWORD": "pw"}, "LV_FLOWER_USER is unset"),
    ],
    ids=["none", "user only", "password only"],
)
def test_the_flower_command_refuses_to_start_exposed(
    tmp_path: Path, credentials: dict[str, str], expected: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LV_")}
    env.update(LV_HOME=str(tmp_path / "home"), **credentials)
    answer = _flower(env, "--address", "0.0.0.0")
    assert answer.returncode == 2, answer.stdout + answer.stderr
    assert expected in " ".join(answer.stderr.split())
    assert not (tmp_path / "home").exists()  # refused before any server was started


@pytest.mark.parametrize(
    ("gpu", "where"), [(None, "cpu"), ("0", "gpu0"), ("3", "gpu3"), ("GPU-1a2b", "gpuGPU-1a2b")]
)
def test_a_worker_is_named_with_its_model_and_gpu(gpu: str | None, where: str) -> None:
    from worker.main import worker_name

    assert worker_name("clip-vit-b32", gpu) == f"clip-vit-b32.{where}@{socket.gethostname()}"
