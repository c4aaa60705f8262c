"""What a benchmark result names its machine by."""

from __future__ import annotations

import platform

import torch


def device_label() -> str:
    """The GPU's name, else `cpu-<architecture>`: the `<device>` of result file names."""
    if torch.cuda.is_available():
        return str(torch.cuda.get_device_name(0))
    return f"cpu-{platform.machine()}"
