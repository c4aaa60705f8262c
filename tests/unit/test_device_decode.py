"""JPEGs decoded on the model's device (`LV_DECODE=device`): the batch decodes them together
(nvJPEG on CUDA; libjpeg on the CPU runs the same code here) and measures blur and brightness
there. Checked against the Pillow path: the same pixels, embeddings, stored facts and errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from tests.images import truncated_jpeg
from tests.tiny_models import load_tiny_backends
from worker.backends.base import ModelBackend
from worker.decode import decode_image
from worker.device_quality import measure_quality_batch, thumbnail_size
from worker.inference import EmbedRequest, InferenceService
from worker.quality import measure_quality
from worker.tensor_input import decode_jpegs, encoded_jpeg, resize_and_crop, stack_rows

MAX_PIXELS = 40_000_000
# Whole-number scales, reductions first (over 512 px), odd ratios, portrait and landscape.
SIZES = [(100, 80), (256, 256), (512, 512), (800, 600), (333, 1000), (1000, 333), (257, 300)]
SIZES += [(640, 480), (1201, 800), (2, 700)]


def photo(width: int, height: int, seed: int = 0, noise: float = 0.2) -> Image.Image:
    """Smooth shapes with some noise: a blur figure far from zero, sensitive to resampling."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    smooth = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
    grain = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    return Image.blend(smooth.filter(ImageFilter.DETAIL), grain, noise)


def jpeg(image: Image.Image, orientation: int = 1) -> bytes:
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(out, "JPEG", quality=92, exif=exif.tobytes())
    return out.getvalue()


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_blur_and_brightness_on_tensors_equal_pillows(width: int, height: int) -> None:
    image = photo(width, height, seed=width + height)

    want = measure_quality(image)
    got = measure_quality_batch([as_tensor(image)])[0]

    assert got.blur == pytest.approx(want.blur, rel=2e-3, abs=1e-6)
    assert got.brightness == pytest.approx(want.brightness, abs=1e-4)


def test_a_blurred_image_scores_lower_on_tensors_as_with_pillow() -> None:
    sharp = photo(640, 480, noise=0.3)
    blurred = sharp.filter(ImageFilter.GaussianBlur(3))

    sharp_q, blurred_q = measure_quality_batch([as_tensor(sharp), as_tensor(blurred)])

    assert blurred_q.blur < sharp_q.blur / 3


@pytest.mark.parametrize(("width", "height"), [*SIZES, (256, 100), (3000, 7)])
def test_thumbnail_size_is_pillows(width: int, height: int) -> None:
    image = Image.new("L", (width, height))
    image.thumbnail((256, 256), Image.Resampling.BOX)

    size = thumbnail_size(width, height, 256)

    assert (size or (width, height)) == image.size


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_jpegs_decode_on_the_device_as_pillow_decodes_them(orientation: int) -> None:
    blobs = [jpeg(photo(120, 90), orientation), jpeg(photo(64, 200).convert("L"), orientation)]
    encoded = [encoded_jpeg(blob, MAX_PIXELS) for blob in blobs]
    assert all(e is not None for e in encoded)

    decoded = decode_jpegs([e for e in encoded if e is not None], "cpu", max_pixels=MAX_PIXELS)

    for blob, pixels, header in zip(blobs, decoded, encoded, strict=True):
        want = decode_image(blob, max_pixels=MAX_PIXELS)
        assert isinstance(pixels, torch.Tensor)
        assert torch.equal(pixels, as_tensor(want.pixels))
        assert header is not None and (header.width, header.height) == (want.width, want.height)


def broken_jpeg(seed: int = 3) -> bytes:
    """A JPEG whose header is whole and whose scan holds a stray frame marker: only decoding
    finds the damage, and both libjpeg and Pillow refuse it."""
    good = jpeg(photo(120, 80, seed=seed, noise=1.0))
    scan = good.index(b"\xff\xda") + 100
    return good[:scan] + b"\xff\xc0\xff\xff" + good[scan + 4 :]


def test_a_jpeg_the_decoder_refuses_gets_pillows_reason(tmp_path: Path) -> None:
    good, broken = jpeg(photo(80, 60)), broken_jpeg()
    cut = truncated_jpeg(tmp_path / "cut.jpg").read_bytes()
    headers = [encoded_jpeg(good, MAX_PIXELS), encoded_jpeg(broken, MAX_PIXELS)]
    assert encoded_jpeg(cut, MAX_PIXELS) is None  # no end marker: left to Pillow, which refuses

    decoded = decode_jpegs([h for h in headers if h is not None], "cpu", max_pixels=MAX_PIXELS)

    assert len(decoded) == 2 and isinstance(decoded[0], torch.Tensor)
    assert torch.equal(decoded[0], as_tensor(decode_image(good, max_pixels=MAX_PIXELS).pixels))
    assert "corrupt or truncated" in str(decoded[1])


def test_a_failed_batch_decode_is_said_once_then_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """A decoder that failed every batch would otherwise pass silently for the slower path."""
    from worker import tensor_input

    tensor_input._batch_failures_noted.clear()
    headers = [encoded_jpeg(b, MAX_PIXELS) for b in (jpeg(photo(80, 60)), broken_jpeg())]
    with caplog.at_level("DEBUG", logger="worker.tensor_input"):
        for _ in range(3):
            decode_jpegs([h for h in headers if h is not None], "cpu", max_pixels=MAX_PIXELS)

    said = [r for r in caplog.records if "failed to decode on cpu" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING", "DEBUG", "DEBUG"]


# -- through the model's batch -----------------------------------------------------------------


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelBackend]:
    return load_tiny_backends(tmp_path_factory.mktemp("device-decode"))


def service(backend: ModelBackend, decode: str) -> InferenceService:
    return InferenceService(
        backend, max_size=16, max_wait_s=0.0, input_path="tensor", decode=decode
    )


def pil_pixels(service: InferenceService, blobs: list[bytes]) -> tuple[torch.Tensor, ...]:
    """What a job on the Pillow path hands the batch: decoded (drafted) pixels."""
    draft = max(service.backend.info.image_size, 256)
    images = [decode_image(b, max_pixels=MAX_PIXELS, draft_size=draft).pixels for b in blobs]
    return tuple(service.preprocess(image) for image in images)


@pytest.mark.parametrize("kind", ["open_clip", "hf_clip", "hf_dino"])
def test_a_batch_of_encoded_jpegs_embeds_as_the_pillow_path(
    kind: str, backends: dict[str, ModelBackend]
) -> None:
    backend = backends[kind]
    blobs = [jpeg(photo(w, h, seed=w)) for w, h in [(300, 200), (64, 64), (90, 400)]]
    blobs.append(jpeg(photo(200, 120, seed=9), orientation=6))
    on_device, on_pil = service(backend, "device"), service(backend, "pil")
    try:
        assert on_device.decodes_on_device and not on_pil.decodes_on_device
        encoded = [on_device.encoded(b) for b in blobs]
        assert all(e is not None for e in encoded)
        texts = ("a red handbag",) if backend.info.has_text else ()
        keys = ("a", "b", "c", "d")
        request = EmbedRequest(tuple(e for e in encoded if e is not None), texts, keys)

        got = on_device.embed(request, timeout=60)
        want = on_pil.embed(EmbedRequest(pil_pixels(on_pil, blobs), texts, keys), timeout=60)
    finally:
        on_device.close()
        on_pil.close()

    cosine = (got.image_embeddings * want.image_embeddings).sum(-1)
    assert cosine.min().item() >= 0.999
    assert got.errors == (None,) * 4 and want.errors == ()
    if texts:
        assert torch.allclose(got.text_embeddings, want.text_embeddings)
    for blob, quality in zip(blobs, got.qualities, strict=True):
        # Against Pillow's full decode: the device decodes JPEGs whole (no draft)
        expected = measure_quality(decode_image(blob, max_pixels=MAX_PIXELS).pixels)
        assert quality is not None
        assert quality.blur == pytest.approx(expected.blur, rel=2e-3)
        assert quality.brightness == pytest.approx(expected.brightness, abs=1e-4)


def test_a_prepared_batch_reaches_the_model_as_rows_of_one_tensor(
    backends: dict[str, ModelBackend],
) -> None:
    """`_prepare` stacks the batch's distinct images once, one batch ahead; the model call
    then slices that tensor instead of copying the batch again."""
    backend = backends["open_clip"]
    on_pil = service(backend, "pil")
    try:
        blobs = [jpeg(photo(w, h, seed=w)) for w, h in [(300, 200), (64, 64), (90, 400)]]
        pixels = pil_pixels(on_pil, blobs)
        requests = [
            EmbedRequest(pixels[:2], (), ("a", "b")),
            EmbedRequest((pixels[1], pixels[2]), (), ("b", "c")),  # "b" shared: prepared once
        ]
        prepared = on_pil._prepare(requests)
        spec = on_pil.input_spec
    finally:
        on_pil.close()

    assert spec is not None
    distinct = [prepared[0].pixels[0], prepared[0].pixels[1], prepared[1].pixels[1]]
    assert prepared[1].pixels[0] is prepared[0].pixels[1]
    model_input = stack_rows(distinct)
    assert model_input.data_ptr() == distinct[0].data_ptr()
    want = torch.stack([resize_and_crop(p, spec, backend.device) for p in pixels])
    assert torch.equal(model_input, want)


def test_an_undecodable_jpeg_fails_alone_in_its_batch(backends: dict[str, ModelBackend]) -> None:
    backend = backends["open_clip"]
    good, broken = jpeg(photo(120, 80)), broken_jpeg()
    on_device = service(backend, "device")
    try:
        items = [on_device.encoded(good), on_device.encoded(broken)]
        assert all(item is not None for item in items)
        result = on_device.embed(
            EmbedRequest(tuple(i for i in items if i is not None), (), ("good", "broken")), 60
        )
    finally:
        on_device.close()

    assert result.errors[0] is None and result.qualities[0] is not None
    assert result.errors[1] is not None and "corrupt or truncated" in result.errors[1]
    assert result.image_embeddings[0].norm().item() == pytest.approx(1.0, abs=1e-4)
    assert result.image_embeddings[1].abs().sum().item() == 0.0


def test_auto_takes_the_tensor_input_path_on_the_cpu_where_the_backend_allows_it(
    backends: dict[str, ModelBackend],
) -> None:
    auto = InferenceService(backends["open_clip"], max_size=4, max_wait_s=0.0)
    asked_pil = InferenceService(
        backends["open_clip"], max_size=4, max_wait_s=0.0, input_path="pil"
    )
    try:
        assert auto.input_spec == backends["open_clip"].input_spec()
        assert asked_pil.input_spec is None
        pixels = auto.preprocess(photo(40, 30).convert("RGB"))
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 30, 40)  # resized in batch
    finally:
        auto.close()
        asked_pil.close()


def test_auto_decodes_with_pillow_on_the_cpu(backends: dict[str, ModelBackend]) -> None:
    auto = InferenceService(backends["open_clip"], max_size=4, max_wait_s=0.0, decode="auto")
    pil_input = InferenceService(
        backends["open_clip"], max_size=4, max_wait_s=0.0, input_path="pil", decode="device"
    )
    try:
        assert not auto.decodes_on_device  # auto: the device only on CUDA
        assert not pil_input.decodes_on_device  # the PIL input path needs decoded images
        assert auto.encoded(jpeg(photo(40, 40))) is None
    finally:
        auto.close()
        pil_input.close()
