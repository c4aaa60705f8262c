"""CUDA out-of-memory in either tower, injected into the real lv-toy model on the CPU: the call
size halves down to one, only the item that cannot fit fails, and the size grows back."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from contract.errors import TransientError
from contract.registry import get_spec, load_registry
from worker.backends import create_backend
from worker.backends.base import ModelBackend
from worker.inference import EmbedRequest, InferenceService


@pytest.fixture(scope="module")
def backend() -> ModelBackend:
    model = create_backend(get_spec(load_registry(), "lv-toy"), device="cpu")
    model.load()
    return model


class Memory:
    """Fails a call with CUDA's own error when it holds more than `fits` items."""

    def __init__(self, real: Callable[[Any], torch.Tensor], fits: int) -> None:
        self.real, self.fits, self.sizes = real, fits, []  # type: ignore[var-annotated]

    def __call__(self, batch: Any) -> torch.Tensor:
        self.sizes.append(len(batch))
        if len(batch) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return self.real(batch)


@pytest.fixture
def service(backend: ModelBackend, monkeypatch: pytest.MonkeyPatch) -> Iterator[InferenceService]:
    running = InferenceService(backend, max_size=16, max_wait_s=0.0, input_path="pil")
    yield running
    running.close()


def pixels(backend: ModelBackend, count: int) -> tuple[torch.Tensor, ...]:
    size = backend.info.image_size
    generator = torch.Generator().manual_seed(count)
    return tuple(torch.rand(3, size, size, generator=generator) for _ in range(count))


def test_texts_too_many_for_memory_are_embedded_in_smaller_calls(
    backend: ModelBackend, service: InferenceService, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"listing number {i}" for i in range(40)]
    expected = backend.embed_texts(texts)
    memory = Memory(backend.embed_texts, fits=7)
    monkeypatch.setattr(backend, "embed_texts", memory)

    got = service.embed(EmbedRequest(texts=tuple(texts)), timeout=60).text_embeddings

    assert torch.allclose(got, expected, atol=1e-5)
    assert max(size for size in memory.sizes[-6:]) <= 7
    assert service._text_chunks.oom_events >= 1


def test_images_too_many_for_memory_are_embedded_in_smaller_calls(
    backend: ModelBackend, service: InferenceService, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = pixels(backend, 12)
    expected = backend.embed_images(torch.stack(images))
    memory = Memory(backend.embed_images, fits=3)
    monkeypatch.setattr(backend, "embed_images", memory)

    got = service.embed(EmbedRequest(images), timeout=60).image_embeddings

    assert torch.allclose(got, expected, atol=1e-5)
    assert memory.sizes[:3] == [12, 6, 3]


def test_a_text_that_never_fits_fails_alone_and_the_others_are_served(
    backend: ModelBackend, service: InferenceService, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = backend.embed_texts

    def huge_text_needs_more_memory_than_there_is(texts: Any) -> torch.Tensor:
        if any(text.startswith("huge") for text in texts):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(texts)

    monkeypatch.setattr(backend, "embed_texts", huge_text_needs_more_memory_than_there_is)
    futures = [
        service.batcher.submit(EmbedRequest(texts=(text,)))
        for text in ("red shoe", "huge text", "blue bag", "green hat")
    ]

    with pytest.raises(TransientError, match="out of memory even for a single text"):
        futures[1].result(timeout=60)
    for future in (futures[0], futures[2], futures[3]):
        assert future.result(timeout=60).text_embeddings.shape == (1, backend.info.embed_dim)


def test_the_call_size_grows_back_after_a_run_of_calls_that_fit(
    backend: ModelBackend, service: InferenceService, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = service._image_chunks
    memory = Memory(backend.embed_images, fits=4)
    monkeypatch.setattr(backend, "embed_images", memory)
    service.embed(EmbedRequest(pixels(backend, 16)), timeout=60)
    assert chunks.size == 4

    memory.fits = 16  # the memory pressure is gone
    chunks.grow_after = 3
    for _ in range(8):
        service.embed(EmbedRequest(pixels(backend, 16)), timeout=60)

    assert chunks.size == 16
    assert memory.sizes[-1] == 16


def test_a_prepared_batch_too_big_to_stack_is_stacked_per_call_instead(
    backend: ModelBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tensor path stacks a batch one ahead of the model; with no memory for that second
    copy, the batch is left apart and the model call stacks it a chunk at a time."""
    images = tuple((torch.rand(3, 40, 30) * 255).to(torch.uint8) for _ in range(5))
    running = InferenceService(backend, max_size=16, max_wait_s=0.0, input_path="tensor")
    try:
        expected = running.embed(EmbedRequest(images), timeout=60).image_embeddings
        real_stack, failed = torch.stack, []

        def stack(tensors: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not failed:  # the first stack is the prepare step's
                failed.append(len(tensors))
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return real_stack(tensors, *args, **kwargs)

        monkeypatch.setattr(torch, "stack", stack)
        got = running.embed(EmbedRequest(images), timeout=60).image_embeddings
    finally:
        monkeypatch.undo()
        running.close()

    assert failed == [5]
    assert torch.allclose(got, expected, atol=1e-6)


def test_what_a_call_out_of_memory_allocated_is_freed_before_the_cache_is_emptied(
    backend: ModelBackend, service: InferenceService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error's traceback holds the failed call's frames: `empty_cache` can only hand their
    memory (activations on a GPU) back once they are cleared, and the smaller calls need it."""
    real = backend.embed_images
    allocated: list[weakref.ref[torch.Tensor]] = []
    held_when_emptied: list[bool] = []

    def embed_images(batch: torch.Tensor) -> torch.Tensor:
        if len(batch) > 2:
            activations = batch * 2  # a local of the failing frame
            allocated.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(batch)

    monkeypatch.setattr(backend, "embed_images", embed_images)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda,
        "empty_cache",
        lambda: held_when_emptied.append(any(ref() is not None for ref in allocated)),
    )
    got = service.embed(EmbedRequest(pixels=pixels(backend, 4)), timeout=60).image_embeddings

    assert got.shape[0] == 4
    assert held_when_emptied == [False]
