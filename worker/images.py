"""A listing's images: fetched concurrently, then decoded only when the model has not seen them.

Each image ends either usable or with its own one-line error; a `TransientError` from any fetch
is re-raised after all fetches finish, so the whole job is retried later.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from contract.errors import FetchTimeout, ListingError, TransientError, one_line
from db.embeddings import CachedImage
from db.records import ImageFacts
from worker.decode_child import decode_and_measure
from worker.fetch import FetchPolicy, NotModified, Validators, fetch_image
from worker.tensor_input import EncodedJpeg

# Stands in for blur and brightness until the model's batch has decoded the image on the device.
UNMEASURED = float("nan")

A = TypeVar("A")
B = TypeVar("B")

# Decoded pixels are big (a 40 Mpx photo is 120 MB as RGB, and a few copies are made): however
# many task threads wait, only this many images are decoded at once. More would not be faster
# on the cores a worker has, only larger.
_DECODE_SLOTS = threading.BoundedSemaphore(max(2, min(8, os.cpu_count() or 2)))


@dataclass(frozen=True)
class ImageRequest:
    """One URL of a listing to fetch; with `known_sha256` and `validators` (from its last fetch)
    the request is conditional."""

    position: int
    url: str
    known_sha256: str | None = None
    validators: Validators | None = None


@dataclass(frozen=True)
class FetchedBytes:
    """One URL of a listing, fetched: its bytes and their SHA-256 (its content address)."""

    position: int
    url: str
    data: bytes
    sha256: str
    validators: Validators = field(default_factory=Validators)


@dataclass(frozen=True)
class Unchanged:
    """One URL of a listing whose server said it still holds the content fetched before."""

    position: int
    url: str
    sha256: str
    validators: Validators | None


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


@dataclass(frozen=True)
class FailedImage:
    """An image that cannot be used, with its one-line reason."""

    position: int
    url: str
    error: str


Fetched = FetchedBytes | Unchanged | FailedImage


def fetch_images(
    urls: Sequence[str], policy: FetchPolicy, executor: Executor, deadline: float | None = None
) -> list[Fetched]:
    """Fetch every URL of one listing at once; failures become per-image errors, and a
    transient one is raised (the job is retried). `deadline` (monotonic seconds): the end of
    the job's attempt, see `fetch_each`."""
    requests = [ImageRequest(i, url) for i, url in enumerate(urls)]
    results = fetch_each(requests, policy, executor, deadline)
    transient = [r for r in results if isinstance(r, TransientError)]
    if transient:
        raise transient[0]
    return [r for r in results if not isinstance(r, TransientError)]


def fetch_each(
    requests: Sequence[ImageRequest],
    policy: FetchPolicy,
    executor: Executor,
    deadline: float | None = None,
) -> list[Fetched | TransientError]:
    """Fetch many URLs at once (a run's chunk: many listings); each ends fetched, unchanged,
    failed or transiently failed, in the order asked.

    `deadline`: an attempt's end (LV_TASK_TIME_LIMIT from its claim). No fetch runs past it,
    so no attempt outlives its time limit (nor the broker's visibility timeout, which would
    deliver the job again while it still runs); one cut short by it failed for the attempt's
    lack of time, not the host's slowness: transient, retried."""
    return _map(lambda request: _fetch_one(request, policy, deadline), requests, executor)


def _fetch_one(
    request: ImageRequest, policy: FetchPolicy, deadline: float | None
) -> Fetched | TransientError:
    position, url = request.position, request.url
    validators = request.validators if request.known_sha256 else None
    cut = False
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            return TransientError(
                f"image {position} not fetched: the attempt ran past LV_TASK_TIME_LIMIT"
            )
        if left < policy.timeout:
            policy, cut = replace(policy, timeout=left), True
    try:
        fetched = fetch_image(url, policy, validators)
    except FetchTimeout as error:
        if cut:
            return TransientError(f"{error}, the rest of the attempt's LV_TASK_TIME_LIMIT")
        return FailedImage(position, url, str(error))
    except ListingError as error:
        return FailedImage(position, url, str(error))
    except TransientError as error:
        return error
    if isinstance(fetched, NotModified):
        assert request.known_sha256 is not None  # only asked with a known content
        return Unchanged(position, url, request.known_sha256, validators)
    # The content address, computed once: unchanged bytes are never embedded twice by a model.
    sha256 = hashlib.sha256(fetched.data).hexdigest()
    return FetchedBytes(position, url, fetched.data, sha256, fetched.validators)


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
        return _map(lambda image: _decoded(prepare(image, True)), fetched, executor)
    first = [prepare(image, False) for image in fetched]  # no decoding in this thread
    done = iter(decode([item for item in first if isinstance(item, FetchedBytes)]))
    return [next(done) if isinstance(item, FetchedBytes) else item for item in first]


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


def _map(work: Callable[[A], B], items: Sequence[A], executor: Executor) -> list[B]:
    """`executor.map`, except that one item runs in the calling thread: a listing's only image
    does not pay a hand-off to another thread and back."""
    if len(items) == 1:
        return [work(items[0])]
    return list(executor.map(work, items))
