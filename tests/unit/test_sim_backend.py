"""The simulated accelerator: timed like the H100 table, GIL released while it waits, never
built in."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from PIL import Image

from contract.registry import ModelSpec, load_registry
from worker.backends import create_backend
from worker.backends.sim import SIMULATED
from worker.inference import EmbedRequest, InferenceService


def sim(name: str) -> ModelSpec:
    return ModelSpec(model_id="sim-x", backend="sim", name=name)


def test_latency_matches_the_h100_figures_at_both_ends() -> None:
    model = SIMULATED["ViT-H-14-378-quickgelu"]

    assert model.seconds(1) == pytest.approx(1 / 31, rel=1e-6)
    assert model.seconds(128) == pytest.approx(128 / 410, rel=1e-6)
    assert model.seconds(64) < model.seconds(128)


def test_an_image_call_takes_its_batch_latency_and_leaves_the_gil_free() -> None:
    backend = create_backend(sim("PE-Core-bigG-14-448"))
    info = backend.load()
    pixels = torch.stack([backend.preprocess(Image.new("RGB", (300, 200), "red"))] * 8)
    assert pixels.shape == (8, 3, info.image_size, info.image_size)
    spins = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal spins
        while not stop.is_set():
            spins += 1

    calls = 3
    expected = calls * SIMULATED["PE-Core-bigG-14-448"].seconds(8)
    spinner = threading.Thread(target=spin)
    spinner.start()
    started = time.perf_counter()
    for _ in range(calls):
        out = backend.embed_images(pixels)
    elapsed = time.perf_counter() - started
    stop.set()
    spinner.join()

    assert out.shape == (8, 1280)
    assert torch.allclose(out.norm(dim=1), torch.ones(8))
    assert elapsed >= expected
    assert backend.slept > 0.5 * expected  # most of the call was a GIL-free wait
    assert spins > 10_000  # another thread ran meanwhile


def test_texts_are_deterministic_and_cheaper_than_images() -> None:
    backend = create_backend(sim("ViT-L-14"))
    backend.load()

    first = backend.embed_texts(["red shoe", "blue bag"])
    again = backend.embed_texts(["red shoe", "blue bag"])

    assert torch.equal(first, again)
    assert not torch.allclose(first[0], first[1])
    model = SIMULATED["ViT-L-14"]
    assert model.seconds(64, 0.25) < model.seconds(64)


def test_it_stays_on_the_cpu_on_a_cuda_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the probe is faked: on a CUDA host the other backends take the GPU by default, and
    # the sim's projection (made on the CPU) met a CUDA input there.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend = create_backend(sim("ViT-B-32"))
    assert backend.device.type == "cpu"
    info = backend.load()
    pixels = torch.stack([backend.preprocess(Image.new("RGB", (64, 64), "red"))] * 2)
    assert backend.embed_images(pixels.to(backend.device)).shape == (2, info.embed_dim)


def test_an_unknown_simulated_model_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'ViT-Z'.*ViT-B-32"):
        create_backend(sim("ViT-Z")).load()


def test_no_built_in_entry_is_simulated() -> None:
    assert all(spec.backend != "sim" for spec in load_registry().values())


@pytest.mark.parametrize("name", ["ViT-H-14-378-quickgelu", "ViT-B-32"])
def test_the_tensor_path_gives_the_embeddings_of_the_pil_path(name: str) -> None:
    """On the tensor path the sim normalises only the grid it reads (device time); the host
    still decodes, resizes and crops, and the embeddings are the PIL path's."""
    backend = create_backend(sim(name))
    backend.load()
    images = [_textured(256, 256, seed) for seed in range(3)] + [_textured(300, 180, 9)]
    answers = {}
    for path in ("pil", "tensor"):
        service = InferenceService(backend, max_size=8, max_wait_s=0.0, input_path=path)
        try:
            request = EmbedRequest(pixels=tuple(service.preprocess(i) for i in images))
            answers[path] = service.embed(request, timeout=30).image_embeddings
        finally:
            service.close()
    spec = backend.input_spec()

    assert spec is not None and spec.output_size == (backend.info.image_size,) * 2
    cosine = torch.nn.functional.cosine_similarity(answers["pil"], answers["tensor"])
    assert cosine.min() >= 0.999


def test_the_model_input_on_the_tensor_path_is_a_normalised_grid() -> None:
    backend = create_backend(sim("ViT-H-14-378-quickgelu"))
    backend.load()
    spec = backend.input_spec()
    assert spec is not None
    batch = torch.full((5, 3, 378, 378), 255, dtype=torch.uint8)

    grid = backend.model_input(batch, spec)

    assert grid.shape == (5, 3, 8, 8) and grid.dtype == torch.float32
    expected = (1.0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert torch.allclose(grid[0, :, 0, 0], expected)


def _textured(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (height // 8 + 1, width // 8 + 1, 3), generator=generator)
    pixels = base.repeat_interleave(8, 0).repeat_interleave(8, 1)[:height, :width]
    return Image.fromarray(pixels.to(torch.uint8).numpy(), "RGB")
