"""The prepare step's own CUDA stream (the tensor path's batch k+1, made ready while batch k is on
the model).

On one stream with the model, the decoder could be handed memory the model's queued kernels still
use: the caching allocator gives a block back to its stream's pool at `free`, trusting stream
order, but nvJPEG writes its output at call time, on a private stream, without waiting for the
caller's (pytorch/vision#9606 reproduced wrong pixels this way on an H100). The allocator keeps a
pool per stream, so a prepare step on a stream of its own never gets a block the model's stream
freed; its work is finished (synchronised) before the batch is handed over, and each tensor
handed over is recorded as used by the model's stream, so its block is not reused on this one
before the model is done with it. It also lets the step's host reads (the quality measures)
wait for its own work only, not for the model's batch queued ahead of it.

On the CPU this is a plain call: the same code runs there, and is tested there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

T = TypeVar("T")


class PrepareStream:
    """Runs the prepare step on a stream of its own on CUDA; a plain call elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def run(self, step: Callable[[], T], handed_over: Callable[[T], Iterable[object]]) -> T:
        """`step()` on this stream, finished before it returns; `handed_over(result)`: the
        tensors (among other things) that the model's (default) stream will read."""
        if self.stream is None:
            return step()
        try:
            with torch.cuda.stream(self.stream):
                result = step()
        except BaseException:
            # Also after a failure: the next step's decoder must not get a block this one's
            # queued kernels still write. A sticky CUDA error raises here again: the step's
            # own error is the one to report.
            with contextlib.suppress(Exception):
                self.stream.synchronize()
            raise
        self.stream.synchronize()
        consumer = torch.cuda.default_stream(self.device)
        for item in handed_over(result):
            if isinstance(item, torch.Tensor) and item.is_cuda:
                item.record_stream(consumer)
        return result
