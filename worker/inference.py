"""The warm model behind the dynamic batcher: one image call and one text call per batch."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from contract.errors import TransientError
from worker.backends.base import ModelBackend
from worker.batching import DynamicBatcher, clear_frames
from worker.decode_child import input_pixels
from worker.decode_pool import DecodePool
from worker.device_quality import measure_quality_batch
from worker.fetch_processes import FetchProcesses
from worker.image_fetch import FailedImage, FetchedBytes, FetchMany
from worker.images import PreparedImage
from worker.prepare_stream import PrepareStream
from worker.quality import ImageQuality
from worker.tensor_input import (
    EncodedJpeg,
    InputSpec,
    decode_jpegs,
    encoded_jpeg,
    resize_and_crop,
    stack_rows,
)

log = logging.getLogger(__name__)
_TEXT_CALL_LIMIT = 256  # texts per text-tower call


@dataclass(frozen=True)
class EmbedRequest:
    """What one job needs from the model: its new images and its texts.

    `keys` (the images' SHA-256, when known) let a batch embed an image shared by several
    listings once, e.g. variants of one product arriving together.
    """

    pixels: tuple[torch.Tensor | EncodedJpeg, ...] = ()
    texts: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    # Set by the batch's prepare step for JPEGs it decoded on the device, one per image.
    decoded: tuple[DeviceDecoded | None, ...] = ()


@dataclass(frozen=True)
class DeviceDecoded:
    """What decoding one JPEG on the device gave: its blur and brightness, or why not."""

    quality: ImageQuality | None = None
    error: str | None = None


@dataclass(frozen=True)
class EmbedResult:
    """One request's rows of a batch's embeddings, and how big that batch was."""

    image_embeddings: torch.Tensor  # (len(pixels), dim); a zero row where `errors` says why
    text_embeddings: torch.Tensor  # (len(texts), dim)
    batch_units: int  # images (or 1 for a text-only job) in the model batch that served it
    # Per image, for JPEGs the batch decoded on the device: their blur and brightness, or why
    # they could not be decoded (None for images that came as pixels). Empty: none did.
    qualities: tuple[ImageQuality | None, ...] = ()
    errors: tuple[str | None, ...] = ()


@dataclass
class ModelCalls:
    """How often the model itself ran: the number dynamic batching exists to keep small."""

    image_calls: int = 0
    text_calls: int = 0
    images: int = 0
    texts: int = 0


class InferenceService:
    """Thread-safe front of one warm model; many jobs' requests share each model call."""

    def __init__(
        self,
        backend: ModelBackend,
        *,
        max_size: int,
        max_wait_s: float,
        input_path: str = "auto",
        decode: str = "auto",
        max_pixels: int = 40_000_000,
        observe: Callable[[str, int], None] | None = None,
        decode_processes: int = 0,
        pool_fetches: bool = False,
    ) -> None:
        self.backend = backend
        self._observe = observe  # (tower, items) per model call, for metrics
        self.calls = ModelCalls()
        self.input_spec = tensor_input_spec(backend, input_path)
        self.decodes_on_device = decodes_on_device(backend, self.input_spec, decode)
        self._max_pixels = max_pixels
        self._prepare_stream = PrepareStream(backend.device)
        self._coming = 0
        self._coming_lock = threading.Lock()
        self._image_chunks = OomChunker(max_size, "image")
        self._text_chunks = OomChunker(_TEXT_CALL_LIMIT, "text")
        self.decode_pool: DecodePool | None = None
        if decode_processes > 0 and self.input_spec is None:
            log.warning(
                "LV_DECODE_PROCESSES=%d is ignored: the pool serves the tensor input path, and "
                "%s takes the PIL path (its own transform per image)",
                decode_processes,
                backend.spec.model_id,
            )
        if pool_fetches and (decode_processes == 0 or self.input_spec is None):
            log.warning("LV_POOL_FETCHES is ignored: there is no pool of decode processes")
        self.fetch_processes: FetchProcesses | None = None
        if decode_processes > 0 and self.input_spec is not None:
            draft, side = max(backend.info.image_size, 256), max(self.input_spec.output_size)
            self.decode_pool = DecodePool(
                decode_processes, max_pixels=max_pixels, draft_size=draft, side=side
            )
            if pool_fetches:
                self.fetch_processes = FetchProcesses(
                    decode_processes,
                    max_pixels=max_pixels,
                    draft_size=draft,
                    side=side,
                    keep_jpegs=self.decodes_on_device,
                )
        self.batcher: DynamicBatcher[EmbedRequest, EmbedResult] = DynamicBatcher(
            self._run_batch,
            max_size=max_size,
            max_wait=max_wait_s,
            units=lambda request: len(request.pixels) or 1,
            name=f"batcher-{backend.spec.model_id}",
            expecting=lambda: self._coming,
            prepare=self._prepare if self.prepares else None,
        )

    @property
    def prepares(self) -> bool:
        """Whether batches are prepared (resized, or decoded on the device) one batch ahead of
        the model, so the pipeline holds a third batch."""
        return self.input_spec is not None

    @contextmanager
    def coming(self) -> Iterator[Ticket]:
        """Announce a request while its job still fetches and decodes, so a batch waits for it
        (and only for such jobs); `embed(..., ticket)` or leaving the block withdraws it."""
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            ticket.withdraw()

    def _count_coming(self, change: int) -> None:
        with self._coming_lock:
            self._coming += change
            none_left = self._coming == 0
        if none_left and change < 0:
            self.batcher.wake()

    def embed(
        self, request: EmbedRequest, timeout: float, ticket: Ticket | None = None
    ) -> EmbedResult:
        """Embeddings for one job's request, computed in a batch with other jobs' requests."""
        if ticket is not None:
            ticket.withdraw()  # first: the batcher never waits for a request it already holds
        future = self.batcher.submit(request, eager=ticket is not None)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            raise TransientError(f"the model did not answer within {timeout:.0f}s") from None

    def embed_many(
        self, requests: Sequence[EmbedRequest], timeout: float, ticket: Ticket | None = None
    ) -> list[EmbedResult | Exception]:
        """Several requests at once (a group's listings, one request each): batched together,
        yet each answers alone, so an item the model refuses fails only its own request."""
        if ticket is not None:
            ticket.withdraw()
        futures = [self.batcher.submit(r, eager=ticket is not None) for r in requests]
        deadline = time.monotonic() + timeout
        answers: list[EmbedResult | Exception] = []
        for future in futures:
            try:
                answers.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                future.cancel()
                answers.append(TransientError(f"the model did not answer within {timeout:.0f}s"))
            except Exception as error:  # this request's own failure, split off by the batcher
                answers.append(error)
        return answers

    def embed_texts(self, texts: list[str], timeout: float = 300.0) -> torch.Tensor:
        """Text embeddings through the same batcher: the category list at start-up, and a
        seller's claim outside the list when it is first met."""
        return self.embed(EmbedRequest(texts=tuple(texts)), timeout).text_embeddings

    def close(self) -> None:
        """Stop the batcher thread after the batches already queued, and the processes."""
        self.batcher.close()
        if self.fetch_processes is not None:
            self.fetch_processes.close()
        if self.decode_pool is not None:
            self.decode_pool.close()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """What a job hands the batcher for one decoded image: the model's input (the backend's
        own transform), or with the tensor input path its uint8 pixels, preprocessed in the
        batch on the model's device."""
        if self.input_spec is None:
            return self.backend.preprocess(image)
        # Held until the batch runs (the same layout a decode process gives).
        side = max(self.input_spec.output_size)
        return torch.from_numpy(input_pixels(image, side)).permute(2, 0, 1)

    @property
    def pool_decode(
        self,
    ) -> Callable[[Sequence[FetchedBytes]], list[PreparedImage | FailedImage]] | None:
        """Where a job's images are decoded when not in its own thread: the pool of decode
        processes (`LV_DECODE_PROCESSES`, tensor input path only), else None."""
        return self.decode_pool.prepare_many if self.decode_pool is not None else None

    @property
    def pool_fetch(self) -> FetchMany | None:
        """Where a job's images are fetched and decoded when not in its own threads: the fetch
        processes of `LV_POOL_FETCHES`, else None."""
        return self.fetch_processes.fetch_many if self.fetch_processes is not None else None

    def encoded(self, data: bytes) -> EncodedJpeg | None:
        """`data` left encoded for the batch to decode on the device (`LV_DECODE`), or None:
        the job decodes it with Pillow."""
        if not self.decodes_on_device:
            return None
        return encoded_jpeg(data, self._max_pixels)

    def _model_input(self, chunk: list[torch.Tensor]) -> torch.Tensor:
        if self.input_spec is None:
            return torch.stack(chunk)
        # The tensor path: `_prepare` resized and cropped these already (uint8, on the device),
        # as rows of one tensor.
        return self.backend.model_input(stack_rows(chunk), self.input_spec)

    def _prepare(self, requests: list[EmbedRequest]) -> list[EmbedRequest]:
        """The tensor path's batch step run one batch ahead, while the previous batch is on
        the model: JPEGs decoded on the device (`LV_DECODE`), then every image resized and
        cropped there, still uint8; the model call itself only normalises and runs. On CUDA
        on a stream of its own (`worker.prepare_stream`)."""
        return self._prepare_stream.run(
            lambda: self._prepare_here(requests),
            lambda prepared: (item for request in prepared for item in request.pixels),
        )

    def _prepare_here(self, requests: list[EmbedRequest]) -> list[EmbedRequest]:
        if self.decodes_on_device:
            requests = self._decode_on_device(requests)
        spec = self.input_spec
        assert spec is not None
        done: dict[str | int, torch.Tensor] = {}  # by content: an image in two requests once
        for request in requests:
            for key, item in zip(_keys(request), request.pixels, strict=True):
                if isinstance(item, torch.Tensor) and key not in done:
                    done[key] = resize_and_crop(item, spec, self.backend.device)
        if done:
            # Stacked here, one batch ahead, in the order the model call takes them: that
            # call then slices this one tensor instead of copying the batch (a fresh copy of
            # a 378-px batch of 128 took 50-100 ms of the model thread on a busy CPU).
            try:
                done = dict(zip(done, torch.stack(list(done.values())), strict=True))
            except torch.cuda.OutOfMemoryError:
                # No room for the batch twice: left apart, the model call stacks it a chunk
                # at a time and halves a chunk that does not fit.
                log.warning("no device memory to stack a prepared batch; stacking per call")
        out = []
        for request in requests:
            pixels = tuple(
                done[key] if isinstance(item, torch.Tensor) else item  # a failed JPEG stays
                for key, item in zip(_keys(request), request.pixels, strict=True)
            )
            out.append(replace(request, pixels=pixels))
        return out

    def _run_batch(self, requests: list[EmbedRequest]) -> list[EmbedResult]:
        slots, unique, decoded = _unique_images(requests)
        usable = [
            (i, pixels)
            for i, (pixels, d) in enumerate(zip(unique, decoded, strict=True))
            if isinstance(pixels, torch.Tensor) and (d is None or d.error is None)
        ]
        if any(
            isinstance(p, EncodedJpeg) and d is None for p, d in zip(unique, decoded, strict=True)
        ):
            raise RuntimeError("an encoded JPEG reached the model undecoded")
        images = self._embed_images([pixels for _, pixels in usable])
        if len(usable) < len(unique):  # a zero row for each image that could not be decoded
            rows, images = images, images.new_zeros((len(unique), images.shape[1]))
            images[[i for i, _ in usable]] = rows
        texts = [t for request in requests for t in request.texts]
        words = self._embed_texts(texts)
        units = len(unique) or len(requests)
        results, i, j = [], 0, 0
        for request in requests:
            n, m = len(request.pixels), len(request.texts)
            mine = slots[i : i + n]
            rows = images[mine] if n else images[:0]
            on_device = [decoded[k] for k in mine]
            qualities: tuple[ImageQuality | None, ...] = ()
            errors: tuple[str | None, ...] = ()
            if any(d is not None for d in on_device):
                qualities = tuple(d.quality if d else None for d in on_device)
                errors = tuple(d.error if d else None for d in on_device)
            results.append(EmbedResult(rows, words[j : j + m], units, qualities, errors))
            i, j = i + n, j + m
        return results

    def _decode_on_device(self, requests: list[EmbedRequest]) -> list[EmbedRequest]:
        """The batch's prepare step (run while the previous batch is on the model): every
        JPEG of every request decoded in one call on the model's device and measured there;
        each request gets its pixels, and per image its measures or why it failed."""
        # By content (the image's key, its SHA-256): a JPEG in several requests decodes once.
        jpegs: dict[str | int, EncodedJpeg] = {}
        for request in requests:
            for key, item in zip(_keys(request), request.pixels, strict=True):
                if isinstance(item, EncodedJpeg):
                    jpegs.setdefault(key, item)
        if not jpegs:
            return requests
        pixels = decode_jpegs(
            list(jpegs.values()), self.backend.device, max_pixels=self._max_pixels
        )
        good = [
            (key, p) for key, p in zip(jpegs, pixels, strict=True) if isinstance(p, torch.Tensor)
        ]
        qualities = measure_quality_batch([p for _, p in good])
        done: dict[str | int, tuple[torch.Tensor | EncodedJpeg, DeviceDecoded]] = {}
        for (key, image), quality in zip(good, qualities, strict=True):
            done[key] = (image, DeviceDecoded(quality=quality))
        for key, failure in zip(jpegs, pixels, strict=True):
            if isinstance(failure, Exception):
                done[key] = (
                    jpegs[key],
                    DeviceDecoded(error=str(failure) or type(failure).__name__),
                )
        out = []
        for request in requests:
            ready = [
                done.get(key, (item, None))
                for key, item in zip(_keys(request), request.pixels, strict=True)
            ]
            out.append(
                replace(
                    request,
                    pixels=tuple(image for image, _ in ready),
                    decoded=tuple(decoded for _, decoded in ready),
                )
            )
        return out

    def _embed_images(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        if not pixels:
            return torch.empty(0, self.backend.info.embed_dim)

        def run(chunk: list[torch.Tensor]) -> torch.Tensor:
            out = self.backend.embed_images(self._model_input(chunk))
            self.calls.image_calls += 1
            self.calls.images += len(chunk)
            if self._observe is not None:
                self._observe("image", len(chunk))
            return out

        return self._image_chunks.run(pixels, run)

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.empty(0, self.backend.info.embed_dim)

        def run(chunk: list[str]) -> torch.Tensor:
            out = self.backend.embed_texts(chunk)
            self.calls.text_calls += 1
            self.calls.texts += len(chunk)
            if self._observe is not None:
                self._observe("text", len(chunk))
            return out

        return self._text_chunks.run(texts, run)


class Ticket:
    """One announced request: counted as coming until submitted or given up."""

    def __init__(self, service: InferenceService) -> None:
        self._service: InferenceService | None = service
        service._count_coming(1)

    def withdraw(self) -> None:
        if self._service is not None:
            self._service._count_coming(-1)
            self._service = None


def decodes_on_device(backend: ModelBackend, spec: InputSpec | None, decode: str) -> bool:
    """Whether JPEGs reach the batch encoded, to be decoded on the model's device: `device`,
    or `auto` on CUDA; only with the tensor input path (its preprocessing takes tensors)."""
    if decode == "pil" or (decode == "auto" and backend.device.type != "cuda"):
        return False
    if spec is None:
        log.info("%s: JPEGs decoded by Pillow (no tensor input path)", backend.spec.model_id)
        return False
    return True


def tensor_input_spec(backend: ModelBackend, input_path: str) -> InputSpec | None:
    """The tensor path's spec unless `pil` is asked for, when the backend's preprocessing can
    be reproduced exactly; else None (the backend's own transform). `auto` takes the tensor
    path on the CPU too: with the resize one batch ahead it measured faster there as well
    (docs/architecture.md)."""
    if input_path == "pil":
        return None
    spec = backend.input_spec()
    if spec is None:
        log.info(
            "%s: preprocessing kept on the PIL path (not reproducible as tensors)",
            backend.spec.model_id,
        )
    return spec


class OomChunker:
    """How many items one model call may take: halved on CUDA out-of-memory, down to one (then
    the error stands, and the batcher's own split leaves the failing item alone); doubled back
    towards the configured size after `grow_after` calls in a row that fit."""

    def __init__(self, limit: int, tower: str, grow_after: int = 50) -> None:
        self.limit = max(1, limit)
        self.size = self.limit
        self.tower = tower
        self.grow_after = grow_after
        self.oom_events = 0
        self._fits = 0

    def run(self, items: list[Any], call: Callable[[list[Any]], torch.Tensor]) -> torch.Tensor:
        out: list[torch.Tensor] = []
        start = 0
        while start < len(items):
            chunk = items[start : start + self.size]
            try:
                out.append(call(chunk))
            except torch.cuda.OutOfMemoryError as error:
                # Its frames hold what the failed call allocated: freed before the retry
                # (and before `empty_cache`), not when the handler ends.
                clear_frames(error)
                self._after_oom(len(chunk))
                continue
            start += len(chunk)
            self._after_fit()
        return torch.cat(out)

    def _after_oom(self, tried: int) -> None:
        self.oom_events += 1
        self._fits = 0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if tried == 1:
            raise TransientError(f"CUDA out of memory even for a single {self.tower} input")
        self.size = max(1, min(self.size, tried) // 2)
        log.warning("CUDA out of memory: %s calls lowered to %d items", self.tower, self.size)

    def _after_fit(self) -> None:
        if self.size >= self.limit:
            return
        self._fits += 1
        if self._fits >= self.grow_after:
            self._fits = 0
            self.size = min(self.limit, self.size * 2)
            log.info("%s calls back up to %d items", self.tower, self.size)


def _keys(request: EmbedRequest) -> tuple[str | int, ...]:
    """Each image's identity: its key (SHA-256) when the request gives one, else the object."""
    if len(request.keys) == len(request.pixels):
        return request.keys
    return tuple(id(item) for item in request.pixels)


def _unique_images(
    requests: list[EmbedRequest],
) -> tuple[list[int], list[torch.Tensor | EncodedJpeg], list[DeviceDecoded | None]]:
    """Each request image's row in the list of distinct images (same key: same row), and
    what decoding each distinct image on the device gave (None: it came decoded)."""
    rows: dict[str, int] = {}
    slots: list[int] = []
    unique: list[torch.Tensor | EncodedJpeg] = []
    decoded: list[DeviceDecoded | None] = []
    for request in requests:
        keys = (
            request.keys
            if len(request.keys) == len(request.pixels)
            else (None,) * len(request.pixels)
        )
        facts = request.decoded or (None,) * len(request.pixels)
        for key, pixels, fact in zip(keys, request.pixels, facts, strict=True):
            if key is not None and key in rows:
                slots.append(rows[key])
                continue
            if key is not None:
                rows[key] = len(unique)
            slots.append(len(unique))
            unique.append(pixels)
            decoded.append(fact)
    return slots, unique, decoded
