"""Batched model input as tensors: decode to uint8 (3, H, W), then resize, crop and normalise on
the model's device, reproducing what each backend's own (PIL or torchvision) preprocessing does.

`InputSpec` is read from the library's loaded transform or image processor, never from a model
name; anything this module cannot reproduce exactly gives `None`, and the caller keeps the PIL
path. Both references quantise to uint8 after resizing (PIL resizes uint8 images; transformers'
torchvision backend rounds its resize back to uint8), so this path does too.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from contract.errors import ImageRejected, one_line
from worker.decode import ALLOWED_FORMATS, _check_pixels, decode_image

log = logging.getLogger(__name__)

ResizeMode = Literal["shortest_edge", "fixed", "keep_ratio"]
Interpolation = Literal["bilinear", "bicubic"]
CropOffset = Literal["round", "floor"]

# PIL resampling ids (Image.Resampling) of the two modes reproduced here.
_PIL_INTERPOLATION: dict[int, Interpolation] = {2: "bilinear", 3: "bicubic"}
_ORIENTATION_TAG = 0x0112  # EXIF Orientation


@dataclass(frozen=True)
class InputSpec:
    """What a backend's preprocessing does to one RGB image.

    resize_mode: "shortest_edge" (short side to `size[0]`, long side truncated as torchvision and
        transformers compute it), "fixed" (squash to `size` = (H, W), as SigLIP processors do) or
        "keep_ratio" (timm/open_clip `ResizeKeepRatio`: scale by the `longest`-weighted ratio,
        rounded).
    interpolation, antialias: the resize filter (PIL always antialiases).
    crop: (H, W) of the centre crop, or None; `crop_offset` is how the offset of an odd margin is
        rounded ("round": torchvision's `int(round(d / 2))`, "floor": transformers' `d // 2`);
        an image smaller than the crop is padded with `pad_fill` first, as both libraries do.
    rescale, mean, std: pixels become `(uint8 * rescale - mean) / std`.
    """

    resize_mode: ResizeMode
    size: tuple[int, int]
    interpolation: Interpolation
    antialias: bool
    crop: tuple[int, int] | None
    crop_offset: CropOffset
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    longest: float = 0.0
    pad_fill: int = 0

    @property
    def output_size(self) -> tuple[int, int]:
        """(H, W) of every preprocessed image."""
        if self.crop is not None:
            return self.crop
        if self.resize_mode != "fixed":
            raise ValueError("an aspect-keeping resize without a crop has no fixed output size")
        return self.size


# ---------------------------------------------------------------------------------------------
# Reading a spec from the libraries' own objects


def input_spec_from_open_clip(transform: Any) -> InputSpec | None:
    """The spec of an open_clip inference `Compose` (`image_transform(..., is_train=False)`), or
    None when it holds a step this module does not reproduce."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(steps, list):
        return None
    # open_clip resizes PIL images, and PIL always antialiases, whatever `Resize.antialias` says.
    fields: dict[str, Any] = {"crop": None, "crop_offset": "round", "antialias": True}
    kinds: list[str] = []
    for step in steps:
        read = _open_clip_step(step)
        if read is None:
            return None
        kind, values = read
        kinds.append(kind)
        fields.update(values)
    kinds = [kind for kind in kinds if kind != "rgb"]
    if kinds not in (_OPEN_CLIP_STEPS, [k for k in _OPEN_CLIP_STEPS if k != "crop"]):
        return None
    if fields["crop"] is None and fields["resize_mode"] != "fixed":
        return None
    return InputSpec(**fields)


_OPEN_CLIP_STEPS = ["resize", "crop", "to_tensor", "normalize"]


def _open_clip_step(step: Any) -> tuple[str, dict[str, Any]] | None:
    """One step of an open_clip transform as spec fields, or None to refuse the transform."""
    from open_clip.transform import CenterCropOrPad, MaybeConvertMode, ResizeKeepRatio
    from torchvision import transforms as T

    if isinstance(step, T.Resize):
        interpolation = _torchvision_interpolation(step.interpolation)
        if interpolation is None or step.max_size is not None:
            return None
        mode = "shortest_edge" if isinstance(step.size, int) or len(step.size) == 1 else "fixed"
        size = _pair(step.size)
        return "resize", {"resize_mode": mode, "size": size, "interpolation": interpolation}
    if isinstance(step, ResizeKeepRatio):
        interpolation = _torchvision_interpolation(step.interpolation)
        if interpolation is None or step.random_scale_prob > 0 or step.random_aspect_prob > 0:
            return None
        return "resize", {
            "resize_mode": "keep_ratio",
            "size": _pair(step.size),
            "interpolation": interpolation,
            "longest": float(step.longest),
        }
    if isinstance(step, CenterCropOrPad | T.CenterCrop):
        fill = getattr(step, "fill", 0)
        if not isinstance(fill, int):
            return None  # a per-channel fill colour
        return "crop", {"crop": _pair(step.size), "pad_fill": fill}
    if isinstance(step, MaybeConvertMode):
        return ("rgb", {}) if step.mode == "RGB" else None
    if isinstance(step, T.ToTensor):  # open_clip's MaybeToTensor too
        return "to_tensor", {"rescale": 1 / 255}
    if isinstance(step, T.Normalize):
        return "normalize", {"mean": _triple(step.mean), "std": _triple(step.std)}
    return None


def input_spec_from_hf(processor: Any) -> InputSpec | None:
    """The spec of a transformers 5 image processor whose pipeline is the library's plain one
    (resize, centre crop, rescale, normalise: CLIP, BiT/DINOv2, SigLIP), or None otherwise."""
    base = _hf_plain_backend(processor)
    if base is None or not processor.do_resize or getattr(processor, "do_pad", False):
        return None
    resize = _hf_resize(processor.size)
    interpolation = _hf_interpolation(processor.resample)
    if resize is None or interpolation is None:
        return None
    crop = _hf_crop(processor) if processor.do_center_crop else None
    if processor.do_center_crop and crop is None:
        return None
    mode, size = resize
    if crop is None and mode != "fixed":
        return None
    if base == "pil" and crop is not None and min(size) < max(crop):
        return None  # numpy's pad-then-crop places the image differently; never met in practice
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if processor.do_normalize:
        mean, std = _triple(processor.image_mean), _triple(processor.image_std)
    return InputSpec(
        resize_mode=mode,
        size=size,
        interpolation=interpolation,
        antialias=True,  # the torchvision backend resizes with antialias=True; PIL always does
        crop=crop,
        crop_offset="floor",
        rescale=float(processor.rescale_factor) if processor.do_rescale else 1.0,
        mean=mean,
        std=std,
    )


# The steps of transformers' generic pipeline: a processor overriding any of them does more.
_HF_STEPS = ("_preprocess", "resize", "center_crop", "rescale", "normalize")


def _hf_plain_backend(processor: Any) -> Literal["torchvision", "pil"] | None:
    try:
        from transformers.image_processing_backends import PilBackend, TorchvisionBackend
    except ImportError:  # transformers 4.x: its processors are not read (callers keep PIL)
        return None
    for base, name in ((TorchvisionBackend, "torchvision"), (PilBackend, "pil")):
        if isinstance(processor, base):
            cls = type(processor)
            if all(getattr(cls, step) is getattr(base, step) for step in _HF_STEPS):
                return name  # type: ignore[return-value]
            return None
    return None


def _hf_resize(size: Any) -> tuple[ResizeMode, tuple[int, int]] | None:
    shortest = _get(size, "shortest_edge")
    height, width = _get(size, "height"), _get(size, "width")
    if _get(size, "longest_edge") or _get(size, "max_height") or _get(size, "max_width"):
        return None
    if shortest:
        return "shortest_edge", (int(shortest), int(shortest))
    if height and width:
        return "fixed", (int(height), int(width))
    return None


def _hf_crop(processor: Any) -> tuple[int, int] | None:
    crop = processor.crop_size
    height, width = _get(crop, "height"), _get(crop, "width")
    return (int(height), int(width)) if height and width else None


def _hf_interpolation(resample: Any) -> Interpolation | None:
    if isinstance(resample, int):  # PILImageResampling is an IntEnum
        return _PIL_INTERPOLATION.get(int(resample))
    return _torchvision_interpolation(resample)


def _torchvision_interpolation(mode: Any) -> Interpolation | None:
    from torchvision.transforms import InterpolationMode

    if mode == InterpolationMode.BICUBIC:
        return "bicubic"
    if mode == InterpolationMode.BILINEAR:
        return "bilinear"
    return None


def _get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    values = tuple(int(v) for v in size)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _triple(values: Any) -> tuple[float, float, float]:
    if isinstance(values, int | float):
        return float(values), float(values), float(values)
    first, second, third = (float(v) for v in values)
    return first, second, third


# ---------------------------------------------------------------------------------------------
# Preprocessing


def preprocess_batch(
    images: Sequence[torch.Tensor],
    spec: InputSpec,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 (3, H, W) images of any sizes to the model's input (N, 3, H', W') on `device`:
    each resized and cropped alone, then stacked, rescaled and normalised together."""
    if not images:
        raise ValueError("preprocess_batch needs at least one image")
    device = torch.device(device)
    return normalise(torch.stack([resize_and_crop(i, spec, device) for i in images]), spec, dtype)


def resize_and_crop(image: torch.Tensor, spec: InputSpec, device: torch.device) -> torch.Tensor:
    """One uint8 (3, H, W) image, resized and cropped on `device`: still uint8, at the spec's
    output size. The worker's batches do this one batch ahead (`InferenceService`)."""
    return _crop(_resize(to_device(image, device), spec), spec)


def stack_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`torch.stack(tensors)`, without the copy when they are already consecutive rows of one
    contiguous tensor (a batch `_prepare` stacked): a view of those rows."""
    first = tensors[0]
    storage = first.untyped_storage()
    address, size, step = storage.data_ptr(), storage.nbytes(), first.numel()
    end = (first.storage_offset() + len(tensors) * step) * first.element_size()
    if (
        first.is_contiguous()
        and end <= size  # two storages can share an address (numpy views): stay inside one
        and all(
            t.is_contiguous()
            and t.shape == first.shape
            and t.dtype == first.dtype
            and t.device == first.device
            and t.untyped_storage().data_ptr() == address
            and t.untyped_storage().nbytes() == size
            and t.storage_offset() == first.storage_offset() + k * step
            for k, t in enumerate(tensors)
        )
    ):
        return first.as_strided(
            (len(tensors), *first.shape), (step, *first.stride()), first.storage_offset()
        )
    return torch.stack(list(tensors))


def normalise(
    batch: torch.Tensor, spec: InputSpec, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 (N, 3, H, W) to `(uint8 * rescale - mean) / std` in `dtype`, on the batch's
    device; in place on its one float32 copy, as every further buffer this size would be
    fresh memory, and fresh memory costs page faults."""
    device = batch.device
    mean = torch.tensor(spec.mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = batch.to(torch.float32, copy=True)
    return pixels.mul_(spec.rescale).sub_(mean).div_(std).to(dtype)


def resized_size(height: int, width: int, spec: InputSpec) -> tuple[int, int]:
    """(H, W) after the spec's resize, rounded exactly as the reference library rounds."""
    if spec.resize_mode == "fixed":
        return spec.size
    if spec.resize_mode == "shortest_edge":
        side = spec.size[0]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(side * long / short)  # truncated, as torchvision and transformers do
        return (new_long, side) if width <= height else (side, new_long)
    ratio_h, ratio_w = height / spec.size[0], width / spec.size[1]
    ratio = max(ratio_h, ratio_w) * spec.longest + min(ratio_h, ratio_w) * (1.0 - spec.longest)
    return round(height / ratio), round(width / ratio)


def _resize(image: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    height, width = int(image.shape[-2]), int(image.shape[-1])
    target = resized_size(height, width, spec)
    if target == (height, width):
        return image  # both references skip an identity resize
    if _native_uint8_resize(image.device, spec):
        out = F.interpolate(
            image[None], size=target, mode=spec.interpolation, align_corners=False, antialias=True
        )
        return out[0]
    # Pillow resizes width first, then height, rounding to uint8 in between; a single float pass
    # would skip that clamp and differ by up to 14 levels where bicubic overshoots.
    pixels = image[None].to(torch.float32)
    if target[1] != width:
        pixels = _float_pass(pixels, (height, target[1]), spec)
    if target[0] != height:
        pixels = _float_pass(pixels, target, spec)
    return pixels.to(torch.uint8)[0]


def _float_pass(pixels: torch.Tensor, size: tuple[int, int], spec: InputSpec) -> torch.Tensor:
    out = F.interpolate(
        pixels, size=size, mode=spec.interpolation, align_corners=False, antialias=spec.antialias
    )
    return out.clamp_(0, 255).round_()


def _native_uint8_resize(device: torch.device, spec: InputSpec) -> bool:
    """Whether to resize uint8 pixels directly: on the CPU, torch's antialiased uint8 kernel is
    Pillow's fixed-point one (and the one transformers' torchvision backend runs there). CUDA has
    no uint8 kernel: two float passes rounded as Pillow rounds; both within +-1 of PIL."""
    return device.type == "cpu" and spec.antialias


def _crop(image: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    if spec.crop is None:
        return image
    crop_h, crop_w = spec.crop
    height, width = int(image.shape[-2]), int(image.shape[-1])
    if crop_h > height or crop_w > width:
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        # left, right, top, bottom: the smaller half before, as torchvision and transformers pad
        padding = (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2)
        image = F.pad(image, padding, mode="constant", value=spec.pad_fill)
        height, width = int(image.shape[-2]), int(image.shape[-1])
    top = _offset(height - crop_h, spec.crop_offset)
    left = _offset(width - crop_w, spec.crop_offset)
    return image[:, top : top + crop_h, left : left + crop_w]


def _offset(margin: int, rule: CropOffset) -> int:
    # torchvision: int(round(margin / 2)), Python's round (half to even: 1.5 -> 2, 2.5 -> 2)
    return round(margin / 2.0) if rule == "round" else margin // 2


def to_device(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`image` on `device`; a CPU tensor bound for CUDA goes through pinned memory, copied
    asynchronously (the caching host allocator keeps the pinned block until the copy is done)."""
    same_index = device.index is None or image.device.index == device.index
    if image.device.type == device.type and same_index:
        return image
    if image.device.type == "cpu" and device.type == "cuda":
        return image.pin_memory().to(device, non_blocking=True)
    return image.to(device)


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG left encoded for the model's batch to decode on the device (`LV_DECODE`): only
    its header was read, for the facts stored per image and the pixel limit."""

    data: bytes
    orientation: int  # EXIF, applied after decoding
    width: int  # as displayed: after the EXIF rotation
    height: int


def encoded_jpeg(data: bytes, max_pixels: int) -> EncodedJpeg | None:
    """`data` as an `EncodedJpeg` when nvJPEG decodes it as Pillow would (a whole RGB or
    greyscale JPEG), else None (Pillow decodes it); raises `ImageRejected` for a header over
    the pixel limit, which is never decoded."""
    header = _nvjpeg_candidate(data, max_pixels)
    if header is None:
        return None
    orientation, width, height = header
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return EncodedJpeg(data, orientation, width, height)


def decode_jpegs(
    jpegs: Sequence[EncodedJpeg], device: torch.device | str, *, max_pixels: int
) -> list[torch.Tensor | Exception]:
    """Each JPEG to uint8 RGB (3, H, W) on `device`, upright, in one decoder call (nvJPEG on
    CUDA, libjpeg on the CPU: the same code path, tested there); one the decoder refuses goes
    through Pillow, which words why it cannot be read."""
    device = torch.device(device)
    decoded = _decode_jpegs_on(device, jpegs)
    return [
        _decode_with_pillow(jpeg.data, device, max_pixels) if image is None else image
        for jpeg, image in zip(jpegs, decoded, strict=True)
    ]


def _nvjpeg_candidate(data: bytes, max_pixels: int) -> tuple[int, int, int] | None:
    """(EXIF orientation, stored width, stored height) of a JPEG nvJPEG decodes as Pillow
    would, else None; raises `ImageRejected` for a header over the pixel limit."""
    # A JPEG not ending in its EOI marker may be truncated: nvJPEG would pad it, Pillow refuses.
    if not data.startswith(b"\xff\xd8") or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Exception:  # Pillow will say why
        return None
    _check_pixels(image.width, image.height, max_pixels)
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None  # CMYK/YCCK and others: Pillow's conversion is the reference
    try:
        orientation = int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:
        return None
    return (orientation if 1 <= orientation <= 8 else 1), image.width, image.height


def _decode_jpegs_on(
    device: torch.device, jpegs: Sequence[EncodedJpeg]
) -> list[torch.Tensor | None]:
    """The JPEGs decoded in one call on `device` (nvJPEG on CUDA) and turned upright; on an
    error each image is tried alone, and None leaves it to Pillow."""
    if not jpegs:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(jpeg.data), dtype=torch.uint8) for jpeg in jpegs]
    try:
        decoded: list[torch.Tensor | None] = list(
            decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        )
    except Exception as error:  # nvJPEG returns nothing when any image fails
        _note_batch_failure(device, error)
        decoded = [_decode_one(data, device) for data in encoded]
    return [
        None if image is None else apply_orientation(image, jpeg.orientation)
        for image, jpeg in zip(decoded, jpegs, strict=True)
    ]


_batch_failures_noted: set[str] = set()


def _note_batch_failure(device: torch.device, error: Exception) -> None:
    """Said once per device type and process (then at debug level): a damaged JPEG in a batch
    does this now and then, but a decoder that fails every batch (nvJPEG unusable on a host)
    would otherwise pass silently for Pillow's slower path."""
    first = device.type not in _batch_failures_noted
    _batch_failures_noted.add(device.type)
    log.log(
        logging.WARNING if first else logging.DEBUG,
        "a batch of JPEGs failed to decode on %s (%s); decoding them one at a time%s",
        device.type,
        one_line(error),
        " (said once; more at debug level)" if first else "",
    )


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        image: torch.Tensor = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return image
    except Exception:  # left to Pillow, which words the reason
        return None


def _decode_with_pillow(
    data: bytes, device: torch.device, max_pixels: int
) -> torch.Tensor | Exception:
    try:
        decoded = decode_image(data, max_pixels=max_pixels)
    except ImageRejected as error:
        return error
    except Exception as error:  # a decoder bug on odd input: this image only
        return ImageRejected(f"could not decode image: {one_line(error)}")
    pixels = torch.from_numpy(np.array(decoded.pixels, dtype=np.uint8))  # (H, W, 3)
    # Moved as (H, W, 3) and viewed as (3, H, W): channels-last is also the layout the uint8
    # resize kernel is fastest on.
    return to_device(pixels, device).permute(2, 0, 1)


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image turned upright as Pillow's `ImageOps.exif_transpose` turns it."""
    if orientation == 2:  # mirrored
        return image.flip(-1)
    if orientation == 3:  # rotated 180
        return image.flip(-2, -1)
    if orientation == 4:  # mirrored vertically
        return image.flip(-2)
    if orientation == 5:  # Pillow TRANSPOSE
        return image.transpose(-2, -1)
    if orientation == 6:  # Pillow ROTATE_270 (clockwise 90)
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:  # Pillow TRANSVERSE
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # Pillow ROTATE_90 (anticlockwise 90)
        return torch.rot90(image, 1, dims=(-2, -1))
    return image
