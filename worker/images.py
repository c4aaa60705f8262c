"""A listing's fetched images (`worker.image_fetch`) made ready for the model: decoded only when
the model has not seen them, each ending usable or with its own one-line error."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from contract.errors import ListingError, one_line
from db.embeddings import CachedImage
from db.records import ImageFacts
from worker.decode_child import DecodedForModel, decode_and_measure
from worker.fetch import Validators
from worker.image_fetch import FailedImage, Fetched, FetchedBytes, Unchanged, map_items
from worker.tensor_input import EncodedJpeg

# Stands in for blur and brightness until the model's batch has decoded the image on the device.
UNMEASURED = float("nan")

# Decoded pixels are big (a 40 Mpx photo is 120 MB as RGB, and a few copies are made): however
# many task threads wait, only this many images are decoded at once. More would not be faster
# on the cores a worker has, only larger.
_DECODE_SLOTS = threading.BoundedSemaphore(max(2, min(8, os.cpu_count() or 2)))


@dataclass(frozen=True)
class PreparedImage:
    """A usable image: its facts, and either model input (`pixels`: a tensor, or a JPEG the
    model's batch decodes on the device, whose blur and brightness it measures there) or a cached
    embedding."""

    position: int
    url: str
    facts: ImageFacts
    pixels: torch.Tensor | EncodedJpeg | None = None
    cached_embedding: np.ndarray | None = None
    validators: Validators | None = None


def prepare_images(
    fetched: Sequence[Fetched],
    cached: dict[str, CachedImage],
    *,
    preprocess: Callable[[Image.Image], torch.Tensor],
    max_pixels: int,
    draft_size: int,
    executor: Executor,
    encode: Callable[[bytes], EncodedJpeg | None] | None = None,
    decode: Callable[[Sequence[FetchedBytes]], list[PreparedImage | FailedImage]] | None = None,
) -> list[PreparedImage | FailedImage]:
    """Decode, measure and preprocess what the model has not embedded yet, in position order.
    With `encode` (JPEGs decoded on the model's device), a JPEG it accepts is passed on
    encoded, its header read here and nothing decoded. With `decode` (a pool of decode
    processes, `worker.decode_pool`), the rest is decoded there, all in one call, instead of
    in these threads."""

    def prepare(image: Fetched, here: bool) -> PreparedImage | FailedImage | FetchedBytes:
        if isinstance(image, FailedImage):
            return image
        known = cached.get(image.sha256)
        if known is not None:
            return PreparedImage(
                image.position, image.url, known.facts, None, known.embedding, image.validators
            )
        if isinstance(image, Unchanged):  # asked conditionally only for a cached content
            return FailedImage(image.position, image.url, "content unknown to this model")
        if image.decoded is not None:  # by the decode process that fetched it
            return prepared_from(image, image.decoded)
        try:
            jpeg = encode(image.data) if encode is not None else None
            if jpeg is not None:
                return _left_encoded(image, jpeg)
            if not here:
                return image  # for the decode pool
            with _DECODE_SLOTS:
                return _decode_and_prepare(image, preprocess, max_pixels, draft_size)
        except ListingError as error:
            return FailedImage(image.position, image.url, str(error))
        except Exception as error:  # a decoder or transform bug on odd input: this image only
            return FailedImage(
                image.position, image.url, f"could not prepare image: {one_line(error)}"
            )

    if decode is None:
        return map_items(lambda image: _decoded(prepare(image, True)), fetched, executor)
    first = [prepare(image, False) for image in fetched]  # no decoding in this thread
    done = iter(decode([item for item in first if isinstance(item, FetchedBytes)]))
    return [next(done) if isinstance(item, FetchedBytes) else item for item in first]


def prepared_from(
    image: FetchedBytes, decoded: DecodedForModel | str
) -> PreparedImage | FailedImage:
    """An image a decode process decoded, as the tensor input path takes it, or failed with
    the reason the process gave."""
    if isinstance(decoded, str):
        return FailedImage(image.position, image.url, decoded)
    pixels = torch.from_numpy(decoded.pixels).permute(2, 0, 1)
    return PreparedImage(image.position, image.url, decoded.facts, pixels, None, image.validators)


def _decoded(item: PreparedImage | FailedImage | FetchedBytes) -> PreparedImage | FailedImage:
    assert not isinstance(item, FetchedBytes)  # decoded in the thread: never left over
    return item


def _decode_and_prepare(
    image: FetchedBytes,
    preprocess: Callable[[Image.Image], torch.Tensor],
    max_pixels: int,
    draft_size: int,
) -> PreparedImage:
    facts, pixels = decode_and_measure(image.data, image.sha256, max_pixels, draft_size)
    return PreparedImage(
        image.position, image.url, facts, preprocess(pixels), None, image.validators
    )


def _left_encoded(image: FetchedBytes, jpeg: EncodedJpeg) -> PreparedImage:
    facts = ImageFacts(
        image.sha256, jpeg.width, jpeg.height, "JPEG", len(image.data), UNMEASURED, UNMEASURED
    )
    return PreparedImage(image.position, image.url, facts, jpeg, None, image.validators)
