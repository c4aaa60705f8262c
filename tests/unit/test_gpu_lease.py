"""The GPU lease kit (bench/gpu_lease): the wheels it carries cover the project's dependencies,
and its preflight's steps run (here on the CPU, where the same functions take `cpu`)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import torch

from bench.gpu_lease.preflight import against_pillow, odd_jpegs

ROOT = Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    found = re.match(r"[A-Za-z0-9_.\-]+", requirement)
    assert found, requirement
    return re.sub(r"[-_.]+", "-", found.group(0)).lower()


def test_every_dependency_is_on_the_device_or_carried() -> None:
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = (ROOT / "bench/gpu_lease/wheels.txt").read_text().splitlines()
    carried = {_name(line) for line in lines if line and not line.startswith("#")}
    (present,) = [line for line in lines if line.startswith("# on-device:")]
    on_device = {_name(name) for name in present.removeprefix("# on-device:").split()}
    missing = {_name(r) for r in wanted} - carried - on_device
    assert not missing, f"add to bench/gpu_lease/wheels.txt: {sorted(missing)}"
    assert not carried & on_device  # carried over the device's own: two versions of one


def test_the_preflight_steps_run_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert against_pillow(cpu)["mean_abs_difference"] < 1.0  # libjpeg on both sides here
    odd = odd_jpegs(cpu)
    assert odd["broken"] == "refused"
    assert odd["adobe_rgb_mean_abs_difference"] < 1.0
