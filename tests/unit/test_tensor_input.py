"""worker.tensor_input: the batched tensor path gives each backend the pixels its own
`preprocess` gives (within one uint8 level), read from the library's loaded transform."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import worker.tensor_input as tensor_input
from contract.errors import ImageRejected
from contract.registry import ModelSpec
from tests.images import png_claiming_size, truncated_jpeg
from tests.tiny_models import load_tiny_backends
from worker.backends import create_backend
from worker.backends.base import ModelBackend
from worker.decode import decode_image
from worker.tensor_input import (
    EncodedJpeg,
    InputSpec,
    apply_orientation,
    decode_jpegs,
    encoded_jpeg,
    input_spec_from_hf,
    input_spec_from_open_clip,
    preprocess_batch,
    stack_rows,
)

MAX_PIXELS = 40_000_000
KINDS = ["open_clip", "hf_clip", "hf_siglip", "hf_dino"]
# Landscape, portrait, odd, smaller than every crop, exactly the crop, far larger, square.
SIZES = [(64, 48), (47, 93), (201, 77), (17, 23), (5, 3), (32, 32), (33, 32), (640, 480)]
SIZES += [(800, 1201), (31, 31)]


def textured(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients, stripes and noise: every resize filter and crop offset shows in the pixels."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    planes = [xs * 255 / width, ys * 255 / height, ((xs + ys) % 37) * 7]
    pixels = np.stack(planes, -1) + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def sample_blobs() -> list[bytes]:
    """JPEG and PNG in turn, plus a transparent PNG (flattened on white by both paths)."""
    blobs = [
        encode(textured(w, h, seed=i), "JPEG" if i % 2 == 0 else "PNG", quality=90)
        for i, (w, h) in enumerate(SIZES)
    ]
    transparent = textured(50, 70).convert("RGBA")
    transparent.putalpha(Image.fromarray(np.tile(np.arange(50, dtype=np.uint8) * 5, (70, 1))))
    return [*blobs, encode(transparent, "PNG")]


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def jpegs() -> list[bytes]:
    """Colour, grey and EXIF-rotated JPEGs of varied sizes: all left encoded for the batch."""
    colour = [encode(textured(w, h, seed=i), "JPEG", quality=90) for i, (w, h) in enumerate(SIZES)]
    grey = encode(textured(90, 60).convert("L"), "JPEG", quality=90)
    rotated = [with_orientation(textured(64, 40), o) for o in (3, 6, 8)]
    return [*colour, grey, *rotated]


def pil_tensor(image: Image.Image) -> torch.Tensor:
    """An image as uint8 (3, H, W), converted as `InferenceService.preprocess` converts it."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def decode_like_the_worker(
    blobs: list[bytes], device: torch.device | str = "cpu", *, max_pixels: int = MAX_PIXELS
) -> list[torch.Tensor | Exception]:
    """Each blob decoded as the worker decodes it with `LV_DECODE=device`: a JPEG that
    `encoded_jpeg` accepts goes, with the others, to one `decode_jpegs` call on `device` (the
    model's batch); any other image through Pillow's `decode_image` (the job's thread), to a
    uint8 CPU tensor. A refusal is that image's result, never the batch's."""
    jobs = [_job_step(blob, max_pixels) for blob in blobs]
    batch = iter(
        decode_jpegs(
            [item for item in jobs if isinstance(item, EncodedJpeg)], device, max_pixels=max_pixels
        )
    )
    return [next(batch) if isinstance(item, EncodedJpeg) else item for item in jobs]


def _job_step(blob: bytes, max_pixels: int) -> EncodedJpeg | torch.Tensor | Exception:
    """What `worker.images.prepare_images` does with one image: left encoded, or decoded."""
    try:
        jpeg = encoded_jpeg(blob, max_pixels)
        if jpeg is not None:
            return jpeg
        return pil_tensor(decode_image(blob, max_pixels=max_pixels).pixels)
    except ImageRejected as error:
        return error


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelBackend]:
    return load_tiny_backends(tmp_path_factory.mktemp("tensor-input"))


@pytest.fixture(params=["uint8 kernel", "float passes"])
def resize_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both resize paths on the CPU: torch's uint8 kernel, and the float passes CUDA runs."""
    if request.param == "float passes":
        monkeypatch.setattr(tensor_input, "_native_uint8_resize", lambda device, spec: False)
    return str(request.param)


def reference_pixels(backend: ModelBackend, blobs: list[bytes]) -> torch.Tensor:
    """What the worker feeds the model today: Pillow decode, then the backend's `preprocess`."""
    images = [decode_image(b, max_pixels=MAX_PIXELS).pixels for b in blobs]
    return torch.stack([backend.preprocess(image) for image in images])


def tensor_pixels(
    backend: ModelBackend, blobs: list[bytes], spec: InputSpec | None = None
) -> torch.Tensor:
    """The tensor path: decoded as the worker decodes, then `preprocess_batch` with the
    backend's spec."""
    decoded = decode_like_the_worker(blobs)
    images = [d for d in decoded if isinstance(d, torch.Tensor)]
    assert len(images) == len(blobs), decoded
    spec = spec or backend.input_spec()
    assert spec is not None
    return preprocess_batch(images, spec, "cpu")


def one_level(spec: InputSpec) -> float:
    """One uint8 step after normalisation, the largest difference allowed anywhere."""
    return spec.rescale / min(spec.std) + 1e-5


def close_enough(got: torch.Tensor, want: torch.Tensor, spec: InputSpec) -> bool:
    """At most one uint8 step anywhere, and on well under 1% of the values."""
    difference = (got - want).abs()
    return difference.max().item() <= one_level(spec) and difference.mean().item() < 2e-4


@pytest.mark.parametrize("kind", KINDS)
def test_tensor_path_gives_the_backends_own_pixels_and_embeddings(
    kind: str, backends: dict[str, ModelBackend], resize_kernel: str
) -> None:
    backend = backends[kind]
    spec = backend.input_spec()
    assert spec is not None
    blobs = sample_blobs()

    want = reference_pixels(backend, blobs)
    got = tensor_pixels(backend, blobs)

    assert got.shape == want.shape and got.dtype == torch.float32
    assert close_enough(got, want, spec)
    cosine = (backend.embed_images(got) * backend.embed_images(want)).sum(-1)
    assert cosine.min().item() >= 0.999


@pytest.mark.parametrize(
    ("kind", "change"),
    [
        ("open_clip", {"interpolation": "bilinear"}),
        ("open_clip", {"crop_offset": "floor"}),
        ("open_clip", {"antialias": False}),
        ("hf_clip", {"interpolation": "bilinear"}),
        ("hf_siglip", {"interpolation": "bilinear"}),
        ("hf_dino", {"crop_offset": "round"}),
        ("hf_dino", {"rescale": 1 / 256}),
    ],
)
def test_a_spec_that_differs_in_one_field_fails_the_tolerance(
    kind: str, change: dict[str, Any], backends: dict[str, ModelBackend]
) -> None:
    backend = backends[kind]
    spec = backend.input_spec()
    assert spec is not None
    blobs = sample_blobs()
    wrong = dataclasses.replace(spec, **change)

    got = tensor_pixels(backend, blobs, wrong)

    assert not close_enough(got, reference_pixels(backend, blobs), spec)


def test_specs_are_read_from_the_loaded_transform_and_processors(
    backends: dict[str, ModelBackend],
) -> None:
    clip_mean = (0.48145466, 0.4578275, 0.40821073)
    open_clip_spec = backends["open_clip"].input_spec()
    siglip = backends["hf_siglip"].input_spec()
    dino = backends["hf_dino"].input_spec()

    assert open_clip_spec is not None and siglip is not None and dino is not None
    assert (open_clip_spec.resize_mode, open_clip_spec.size, open_clip_spec.crop) == (
        "shortest_edge",
        (32, 32),
        (32, 32),
    )
    assert (open_clip_spec.interpolation, open_clip_spec.crop_offset) == ("bicubic", "round")
    assert open_clip_spec.mean == pytest.approx(clip_mean)
    assert (siglip.resize_mode, siglip.size, siglip.crop, siglip.mean) == (
        "fixed",
        (32, 32),
        None,
        (0.5, 0.5, 0.5),
    )
    assert (dino.size, dino.crop, dino.crop_offset, dino.output_size) == (
        (32, 32),
        (28, 28),
        "floor",
        (28, 28),
    )


@pytest.mark.parametrize(
    ("resize_mode", "fill_color", "image_size"),
    [
        ("longest", 0, 32),
        ("longest", 128, 32),
        ("squash", 0, 32),
        ("shortest", 0, (32, 24)),
        ("squash", 0, (24, 40)),
    ],
)
def test_every_open_clip_resize_mode_is_reproduced(
    resize_mode: str, fill_color: int, image_size: int | tuple[int, int]
) -> None:
    import open_clip

    transform = open_clip.image_transform(
        image_size, is_train=False, resize_mode=resize_mode, fill_color=fill_color
    )
    spec = input_spec_from_open_clip(transform)
    assert spec is not None
    images = [textured(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]

    want = torch.stack([transform(image) for image in images])
    got = preprocess_batch([pil_tensor(image) for image in images], spec, "cpu")

    assert got.shape == want.shape
    if resize_mode != "squash":
        assert close_enough(got, want, spec)
        return
    # Squashing scales width and height by different factors, and Pillow 13 then sometimes runs
    # its vertical pass first (rounding to uint8 in between): a few values differ by more.
    off = (got - want).abs() > one_level(spec)
    assert off.float().mean().item() < 0.01 and (got - want).abs().mean().item() < 3e-3


def test_open_clip_transforms_with_unknown_steps_are_refused() -> None:
    import open_clip
    from torchvision import transforms as T

    transform = open_clip.image_transform(32, is_train=False)
    with_jitter = T.Compose(
        [*transform.transforms[:-1], T.ColorJitter(0.4), transform.transforms[-1]]
    )
    lanczos = T.Compose([T.Resize(32, T.InterpolationMode.LANCZOS), *transform.transforms[1:]])
    unnormalised = T.Compose(transform.transforms[:-1])

    assert input_spec_from_open_clip(transform) is not None
    assert input_spec_from_open_clip(with_jitter) is None
    assert input_spec_from_open_clip(lanczos) is None
    assert input_spec_from_open_clip(unnormalised) is None
    assert input_spec_from_open_clip(open_clip.image_transform(32, is_train=True)) is None


def test_hf_processors_doing_more_than_the_plain_pipeline_are_refused() -> None:
    from transformers import BitImageProcessor, CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    class Padded(CLIPImageProcessor):
        def _preprocess(self, *args: Any, **kwargs: Any) -> Any:
            return super()._preprocess(*args, **kwargs)

    plain: dict[str, Any] = {
        "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32},
    }
    assert input_spec_from_hf(CLIPImageProcessor(**plain)) is not None
    assert input_spec_from_hf(Padded(**plain)) is None
    assert (
        input_spec_from_hf(CLIPImageProcessor(**plain, resample=PILImageResampling.LANCZOS)) is None
    )
    longest = {"shortest_edge": 32, "longest_edge": 64}
    assert input_spec_from_hf(CLIPImageProcessor(size=longest)) is None
    assert input_spec_from_hf(BitImageProcessor(**plain, do_resize=False)) is None
    assert input_spec_from_hf(BitImageProcessor(**plain, do_pad=True)) is None


def test_hf_pil_backend_processors_are_read_too() -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    spec = input_spec_from_hf(processor)
    assert spec is not None
    images = [textured(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]

    want = processor(images=images, return_tensors="pt")["pixel_values"]
    got = preprocess_batch([pil_tensor(image) for image in images], spec, "cpu")

    assert close_enough(got, want, spec)


def test_a_base_backend_has_no_spec_and_keeps_pil() -> None:
    backend = create_backend(ModelSpec("sim", "sim", "ViT-B-32"))
    backend.load()

    assert ModelBackend.input_spec(backend) is None  # what a backend gets unless it says


def test_preprocess_batch_outputs_the_asked_dtype_and_refuses_an_empty_batch(
    backends: dict[str, ModelBackend],
) -> None:
    spec = backends["hf_dino"].input_spec()
    assert spec is not None
    images = [pil_tensor(textured(40, 30)), pil_tensor(textured(30, 90))]

    batch = preprocess_batch(images, spec, torch.device("cpu"), torch.bfloat16)

    assert batch.shape == (2, 3, 28, 28) and batch.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        preprocess_batch([], spec, "cpu")


# -- decoding ---------------------------------------------------------------------------------


def test_jpegs_decoded_in_a_batch_give_pillows_pixels_exactly() -> None:
    blobs = jpegs()
    encoded = [encoded_jpeg(blob, MAX_PIXELS) for blob in blobs]
    assert all(jpeg is not None for jpeg in encoded)

    decoded = decode_jpegs([j for j in encoded if j is not None], "cpu", max_pixels=MAX_PIXELS)

    for blob, tensor in zip(blobs, decoded, strict=True):
        assert isinstance(tensor, torch.Tensor)
        want = pil_tensor(decode_image(blob, max_pixels=MAX_PIXELS).pixels)
        assert tensor.dtype == torch.uint8 and tensor.device.type == "cpu"
        assert torch.equal(tensor, want)


def test_in_a_mixed_batch_only_jpegs_reach_the_decoder_and_all_give_pillows_pixels() -> None:
    image = textured(60, 40, seed=5)
    others = [encode(image, f) for f in ("WEBP", "GIF", "BMP", "TIFF")]
    blobs = [*sample_blobs(), *others, encode(image.convert("CMYK"), "JPEG")]
    expected_jpegs = sum(1 for i in range(len(SIZES)) if i % 2 == 0)  # sample_blobs' JPEGs

    left_encoded = [encoded_jpeg(blob, MAX_PIXELS) is not None for blob in blobs]
    decoded = decode_like_the_worker(blobs)

    assert sum(left_encoded) == expected_jpegs  # PNG, WEBP, ..., CMYK JPEG: Pillow's
    for blob, tensor in zip(blobs, decoded, strict=True):
        assert isinstance(tensor, torch.Tensor)
        assert torch.equal(tensor, pil_tensor(decode_image(blob, max_pixels=MAX_PIXELS).pixels))


def test_a_large_jpeg_is_drafted_by_pillow_and_decoded_whole_in_the_batch() -> None:
    blob = encode(textured(1600, 1200), "JPEG", quality=90)
    jpeg = encoded_jpeg(blob, MAX_PIXELS)
    assert jpeg is not None

    drafted = decode_image(blob, max_pixels=MAX_PIXELS, draft_size=256)
    (whole,) = decode_jpegs([jpeg], "cpu", max_pixels=MAX_PIXELS)

    assert drafted.pixels.size == (400, 300)  # decoded at 1/4 scale, still >= 256 a side
    assert (drafted.width, drafted.height) == (jpeg.width, jpeg.height) == (1600, 1200)
    assert isinstance(whole, torch.Tensor) and tuple(whole.shape) == (3, 1200, 1600)
    assert torch.equal(whole, pil_tensor(decode_image(blob, max_pixels=MAX_PIXELS).pixels))


def test_a_corrupt_image_becomes_its_own_error_and_the_rest_decode(tmp_path: Path) -> None:
    good_png, good_jpeg = encode(textured(40, 30), "PNG"), encode(textured(40, 30), "JPEG")
    truncated = truncated_jpeg(tmp_path / "cut.jpg").read_bytes()
    blobs = [good_png, b"not an image at all", truncated, b"", good_jpeg]

    decoded = decode_like_the_worker(blobs)

    assert [type(d).__name__ for d in decoded] == [
        "Tensor",
        "ImageRejected",
        "ImageRejected",
        "ImageRejected",
        "Tensor",
    ]
    assert "corrupt or truncated" in str(decoded[2])


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = png_claiming_size(tmp_path / "bomb.png", 30_000, 30_000).read_bytes()
    large_jpeg = encode(textured(300, 200), "JPEG")

    # The batch path's guard: the JPEG is refused from its header, never left for the device.
    with pytest.raises(ImageRejected, match="LV_MAX_IMAGE_PIXELS"):
        encoded_jpeg(large_jpeg, max_pixels=50_000)
    assert encoded_jpeg(bomb, max_pixels=50_000) is None  # not a JPEG: Pillow's to refuse
    # The Pillow path (every other format, and JPEGs with LV_DECODE=pil) refuses both too.
    for blob in (bomb, large_jpeg):
        with pytest.raises(ImageRejected, match="LV_MAX_IMAGE_PIXELS"):
            decode_image(blob, max_pixels=50_000)


def test_only_complete_rgb_or_grey_jpegs_are_sent_to_nvjpeg(tmp_path: Path) -> None:
    image = textured(40, 30)

    def candidate(data: bytes, max_pixels: int) -> tuple[int, int, int] | None:
        jpeg = encoded_jpeg(data, max_pixels)
        return None if jpeg is None else (jpeg.orientation, jpeg.width, jpeg.height)

    assert candidate(encode(image, "JPEG"), MAX_PIXELS) == (1, 40, 30)
    assert candidate(encode(image.convert("L"), "JPEG"), MAX_PIXELS) == (1, 40, 30)
    assert candidate(with_orientation(image, 6), MAX_PIXELS) == (6, 30, 40)  # as displayed
    assert candidate(encode(image.convert("CMYK"), "JPEG"), MAX_PIXELS) is None
    assert candidate(encode(image, "PNG"), MAX_PIXELS) is None
    assert candidate(truncated_jpeg(tmp_path / "cut.jpg").read_bytes(), MAX_PIXELS) is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_tensors_matches_pillows_exif_transpose(orientation: int) -> None:
    blob = with_orientation(textured(40, 24), orientation)
    raw = pil_tensor(Image.open(io.BytesIO(blob)).convert("RGB"))

    upright = pil_tensor(decode_image(blob, max_pixels=MAX_PIXELS).pixels)

    assert torch.equal(apply_orientation(raw, orientation), upright)


def test_cpu_tensors_stay_where_they_are_without_pinning() -> None:
    image = pil_tensor(textured(8, 8))

    moved = tensor_input.to_device(image, torch.device("cpu"))

    assert moved is image and not moved.is_pinned()


def test_stack_rows_views_consecutive_rows_of_one_tensor_and_copies_anything_else() -> None:
    batch = torch.arange(5 * 3 * 4 * 4, dtype=torch.uint8).reshape(5, 3, 4, 4)
    rows = list(batch)

    middle = stack_rows(rows[1:4])  # what a prepared batch (or a slice of it) hands the model
    assert torch.equal(middle, batch[1:4])
    assert middle.data_ptr() == batch[1].data_ptr()  # no copy

    array = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2)
    # Two storages at one address: the first row alone, and the whole array.
    shared = [torch.from_numpy(array[0]), torch.from_numpy(array)[1]]
    for others in ([rows[2], rows[1]], [rows[0], rows[2]], [batch[0].clone(), rows[1]], shared):
        stacked = stack_rows(others)  # out of order, a gap, another tensor: copied
        assert torch.equal(stacked, torch.stack(others))
        assert stacked.data_ptr() != others[0].data_ptr()
