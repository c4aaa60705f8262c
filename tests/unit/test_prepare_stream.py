"""Off CUDA the prepare step's stream is a plain call (the tensor path's CPU tests run it)."""

from __future__ import annotations

import pytest
import torch

from worker.prepare_stream import PrepareStream


def test_on_the_cpu_the_step_is_a_plain_call_and_its_errors_pass_through() -> None:
    stream = PrepareStream(torch.device("cpu"))
    assert stream.stream is None
    handed: list[object] = []
    tensor = torch.ones(2)
    assert stream.run(lambda: [tensor], lambda out: handed.extend(out) or out) == [tensor]
    assert handed == []  # nothing recorded off CUDA

    def broken() -> list[torch.Tensor]:
        raise RuntimeError("decoder trouble")

    with pytest.raises(RuntimeError, match="decoder trouble"):
        stream.run(broken, lambda out: out)
