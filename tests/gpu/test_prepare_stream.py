"""The prepare step decodes on its own stream: memory the model's stream frees with its kernels
still queued never reaches nvJPEG, which writes at call time (pytorch/vision#9606)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.gpu_lease.preflight import free_while_busy
from tests.tiny_models import load_tiny_backends
from tests.unit.test_device_decode import jpeg, photo
from worker.inference import EmbedRequest, InferenceService


def _pixels(prepared: list[EmbedRequest]) -> list[torch.Tensor]:
    return [p.cpu() for r in prepared for p in r.pixels if isinstance(p, torch.Tensor)]


def _prepared_in_another_thread(
    service: InferenceService, request: EmbedRequest
) -> list[torch.Tensor]:
    """As the batcher's prepare thread runs it (its current stream is its own business)."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(lambda: _pixels(service._prepare([request]))).result()


def test_prepared_pixels_stay_right_while_the_model_stream_frees_busy_memory(
    tmp_path: Path,
) -> None:
    backend = load_tiny_backends(tmp_path)["open_clip"]
    service = InferenceService(backend, max_size=64, max_wait_s=0.0)
    try:
        assert service.decodes_on_device
        blobs = [jpeg(photo(640, 480, seed=n)) for n in range(16)]
        request = EmbedRequest(tuple(service.encoded(b) for b in blobs), (), ())
        reference = _pixels(service._prepare([request]))
        wrong = 0
        for _ in range(30):
            free_while_busy(torch.device("cuda"), 3 * 480 * 640)  # a decoded image's size
            got = _prepared_in_another_thread(service, request)
            wrong += sum(not torch.equal(a, b) for a, b in zip(got, reference, strict=True))
        torch.cuda.synchronize()
        assert wrong == 0
    finally:
        service.close()
