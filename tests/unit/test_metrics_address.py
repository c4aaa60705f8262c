"""Where a worker's metrics listen: every interface for a deployment, loopback under `up`."""

from __future__ import annotations

import socket
import urllib.request

import psutil
import pytest

from contract.settings import SettingsError, load_settings
from listing_vision.supervisor import worker_env
from worker.metrics import WorkerMetrics


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening_on(port: int) -> set[str]:
    return {
        c.laddr.ip
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_metrics_listen_on_the_configured_address_only(host: str) -> None:
    port = _free_port()

    assert WorkerMetrics("addr-test").serve(port, host)

    assert _listening_on(port) == {host}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert b"lv_jobs_total" in reply.read()


def test_up_puts_its_workers_metrics_on_loopback_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    servers = {"database_url": "postgresql://x@127.0.0.1/x", "broker_url": "redis://127.0.0.1/0"}
    monkeypatch.delenv("LV_METRICS_HOST", raising=False)
    assert worker_env(load_settings(**servers))["LV_METRICS_HOST"] == "127.0.0.1"
    assert load_settings(**servers).metrics_host == "0.0.0.0"  # `worker` alone: every interface

    monkeypatch.setenv("LV_METRICS_HOST", "::")
    assert worker_env(load_settings(**servers))["LV_METRICS_HOST"] == "::"


def test_a_metrics_host_that_is_not_an_address_is_a_bad_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LV_METRICS_HOST", "everywhere")

    with pytest.raises(SettingsError, match="LV_METRICS_HOST"):
        load_settings()
