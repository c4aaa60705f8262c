"""On a GPU, the tensor input path (nvJPEG decode, resize and normalise on the device) gives what
the CPU path and each backend's own `preprocess` give."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contract.errors import ImageRejected
from tests.images import truncated_jpeg
from tests.tiny_models import load_tiny_backends
from tests.unit.test_tensor_input import (
    KINDS,
    MAX_PIXELS,
    decode_like_the_worker,
    encode,
    jpegs,
    one_level,
    pil_tensor,
    sample_blobs,
    textured,
)
from worker.backends.base import ModelBackend
from worker.decode import decode_image
from worker.inference import InferenceService
from worker.tensor_input import encoded_jpeg, preprocess_batch, to_device

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelBackend]:
    return load_tiny_backends(tmp_path_factory.mktemp("gpu-input"))


def test_nvjpeg_decode_matches_the_cpu_and_failures_stay_per_image(tmp_path: Path) -> None:
    png = encode(textured(50, 30), "PNG")
    truncated = truncated_jpeg(tmp_path / "cut.jpg").read_bytes()
    blobs = [*jpegs(), png, truncated, b"\xff\xd8 not a jpeg \xff\xd9"]

    on_gpu = decode_like_the_worker(blobs, CUDA)
    on_cpu = decode_like_the_worker(blobs, "cpu")

    for got, want in zip(on_gpu[:-3], on_cpu[:-3], strict=True):
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
        assert got.device.type == "cuda" and got.dtype == torch.uint8
        assert got.shape == want.shape  # EXIF orientation applied on the GPU too
        difference = (got.cpu().float() - want.float()).abs()
        assert difference.mean().item() < 2.0  # IDCT and chroma upsampling differ slightly
    assert encoded_jpeg(png, MAX_PIXELS) is None  # the PNG went through Pillow
    png_on_gpu, png_on_cpu = on_gpu[-3], on_cpu[-3]
    assert isinstance(png_on_gpu, torch.Tensor) and isinstance(png_on_cpu, torch.Tensor)
    assert torch.equal(png_on_gpu, png_on_cpu)
    assert isinstance(on_gpu[-2], ImageRejected) and isinstance(on_gpu[-1], ImageRejected)


def test_the_pixel_limit_holds_on_the_gpu_path(backends: dict[str, ModelBackend]) -> None:
    large = encode(textured(300, 200), "JPEG")
    service = InferenceService(backends["open_clip"], max_size=4, max_wait_s=0.0, max_pixels=50_000)
    try:
        assert service.decodes_on_device  # auto: JPEGs are left for nvJPEG on CUDA
        with pytest.raises(ImageRejected, match="LV_MAX_IMAGE_PIXELS"):
            service.encoded(large)  # refused from its header, never sent to the GPU
    finally:
        service.close()


@pytest.mark.parametrize("kind", KINDS)
def test_preprocess_on_cuda_equals_the_cpu(kind: str, backends: dict[str, ModelBackend]) -> None:
    spec = backends[kind].input_spec()
    assert spec is not None
    images = [d for d in decode_like_the_worker(sample_blobs()) if isinstance(d, torch.Tensor)]

    on_gpu = preprocess_batch(images, spec, CUDA)  # CPU tensors copied through pinned memory
    on_cpu = preprocess_batch(images, spec, "cpu")

    assert on_gpu.device.type == "cuda"
    difference = (on_gpu.cpu() - on_cpu).abs()
    assert difference.max().item() <= one_level(spec)
    assert difference.mean().item() < 2e-4


@pytest.mark.parametrize("kind", KINDS)
def test_gpu_tensor_path_embeds_as_the_backends_own_preprocess(
    kind: str, backends: dict[str, ModelBackend]
) -> None:
    backend = backends[kind]
    spec = backend.input_spec()
    assert spec is not None
    blobs = [*jpegs(), *sample_blobs()]
    reference = torch.stack(
        [backend.preprocess(decode_image(b, max_pixels=MAX_PIXELS).pixels) for b in blobs]
    )
    decoded = decode_like_the_worker(blobs, CUDA)  # JPEGs on the GPU, the rest on the CPU
    images = [d for d in decoded if isinstance(d, torch.Tensor)]
    assert len(images) == len(blobs)

    pixels = preprocess_batch(images, spec, CUDA, backend.dtype)

    assert pixels.dtype == backend.dtype
    cosine = (backend.embed_images(pixels) * backend.embed_images(reference)).sum(-1)
    assert cosine.min().item() >= 0.999


def test_a_pillow_decoded_image_reaches_the_gpu_intact() -> None:
    image = pil_tensor(textured(40, 30))
    (decoded,) = decode_like_the_worker([encode(textured(40, 30), "PNG")], CUDA)
    assert isinstance(decoded, torch.Tensor) and decoded.device.type == "cpu"  # the job's tensor

    moved = to_device(decoded, CUDA)  # as `preprocess_batch` moves it: through pinned memory

    assert moved.device.type == "cuda"
    assert torch.equal(moved.cpu(), image)


def test_jpegs_decoded_in_a_cuda_batch_measure_and_embed_as_the_pillow_path(
    backends: dict[str, ModelBackend],
) -> None:
    """LV_DECODE on CUDA (its default there): a batch of encoded JPEGs is decoded by nvJPEG,
    measured and embedded on the GPU as the Pillow path does on the CPU."""
    from tests.unit.test_device_decode import broken_jpeg, jpeg, photo
    from worker.inference import EmbedRequest, InferenceService
    from worker.quality import measure_quality

    backend = backends["open_clip"]
    assert backend.device.type == "cuda"
    blobs = [jpeg(photo(w, h, seed=w)) for w, h in [(640, 480), (64, 64), (90, 400)]]
    blobs.append(broken_jpeg())
    on_gpu = InferenceService(backend, max_size=16, max_wait_s=0.0)  # auto: device on CUDA
    try:
        assert on_gpu.decodes_on_device
        items = [on_gpu.encoded(b) for b in blobs]
        assert all(item is not None for item in items)
        request = EmbedRequest(tuple(i for i in items if i is not None), (), ("a", "b", "c", "d"))
        got = on_gpu.embed(request, timeout=120)
    finally:
        on_gpu.close()

    assert got.errors[:3] == (None, None, None) and got.errors[3] is not None
    for blob, quality in zip(blobs[:3], got.qualities, strict=False):
        expected = measure_quality(decode_image(blob, max_pixels=MAX_PIXELS).pixels)
        assert quality is not None
        assert quality.blur == pytest.approx(expected.blur, rel=1e-2)
        assert quality.brightness == pytest.approx(expected.brightness, abs=2e-3)
    assert got.image_embeddings[3].abs().sum().item() == 0.0
