"""Device and mixed precision for training: fp32 master weights, the forward pass under
`torch.autocast` (bf16 where the GPU has it, else fp16 with a `GradScaler`); fp32 on the CPU
unless asked (bf16/fp16 autocast also runs on the CPU, slowly: it is how tests cover it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from listing_vision.training.errors import TrainingError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class MixedPrecision:
    """How the forward and backward passes run on `device`."""

    device: torch.device
    name: str  # "fp32", "bf16" or "fp16"

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.name)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward pass (and the loss) in the chosen precision."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            yield

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
        return torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None


def choose_device(requested: str | None) -> torch.device:
    """The GPU when there is one (or the one asked for), else the CPU."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise TrainingError(f"--device {requested!r}: not cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {requested}: no CUDA GPU is visible")
    if device.type not in ("cpu", "cuda"):
        raise TrainingError(f"--device {requested}: train runs on cpu or cuda")
    return device


def choose_precision(requested: str, device: torch.device) -> MixedPrecision:
    """`auto`: bf16 on a GPU that has it, fp16 on an older one, fp32 on the CPU."""
    if requested not in PRECISIONS:
        raise TrainingError(f"--precision {requested!r}: not one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return MixedPrecision(device, requested)
    if device.type != "cuda":
        return MixedPrecision(device, "fp32")
    return MixedPrecision(device, "bf16" if torch.cuda.is_bf16_supported() else "fp16")
