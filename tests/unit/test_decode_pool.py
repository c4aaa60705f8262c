"""worker.decode_pool: images decoded in a pool of real processes give exactly what the job's
own thread gives (facts, blur, brightness, pixels, refusals), and a process that dies fails
only the image that killed it; the pool is replaced and keeps serving."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.images import png_claiming_size, truncated_jpeg
from tests.unit.test_tensor_input import encode, sample_blobs, textured
from worker.decode_child import DecodedForModel, decode_for_model
from worker.decode_pool import DecodePool
from worker.images import FailedImage, FetchedBytes, PreparedImage, prepare_images

MAX_PIXELS = 40_000_000
DRAFT, SIDE = 256, 64
KILLER = b"kill the decoder process"


def crash_on_cue(
    data: bytes, sha256: str, max_pixels: int, draft_size: int, side: int
) -> DecodedForModel | str:
    """Runs in a pool process: dies on `KILLER` (as a decoder crash would), else decodes."""
    if data == KILLER:
        os._exit(1)
    return decode_for_model(data, sha256, max_pixels, draft_size, side)


def fetched(blobs: list[bytes]) -> list[FetchedBytes]:
    return [
        FetchedBytes(i, f"file:///img/{i}", blob, hashlib.sha256(blob).hexdigest())
        for i, blob in enumerate(blobs)
    ]


def thread_pixels(image: object) -> torch.Tensor:
    """What `InferenceService.preprocess` gives on the tensor path."""
    from worker.decode_child import input_pixels

    return torch.from_numpy(input_pixels(image, SIDE)).permute(2, 0, 1)  # type: ignore[arg-type]


@pytest.fixture
def pool() -> Iterator[DecodePool]:
    made = DecodePool(2, max_pixels=MAX_PIXELS, draft_size=DRAFT, side=SIDE, work=crash_on_cue)
    yield made
    made.close()


def prepared(blobs: list[bytes], pool: DecodePool | None) -> list[PreparedImage | FailedImage]:
    with ThreadPoolExecutor(4) as executor:
        return prepare_images(
            fetched(blobs),
            {},
            preprocess=thread_pixels,
            max_pixels=MAX_PIXELS,
            draft_size=DRAFT,
            executor=executor,
            decode=pool.prepare_many if pool is not None else None,
        )


def test_a_pool_gives_what_the_thread_gives(pool: DecodePool, tmp_path: Path) -> None:
    big = encode(textured(700, 520, seed=3), "PNG")  # reduced by a whole factor (2) first
    bomb = png_claiming_size(tmp_path / "bomb.png", 30_000, 30_000).read_bytes()
    cut = truncated_jpeg(tmp_path / "cut.jpg").read_bytes()
    blobs = [*sample_blobs(), big, bomb, cut, b"not an image at all"]

    by_pool = prepared(blobs, pool)
    by_thread = prepared(blobs, None)

    assert len(by_pool) == len(by_thread) == len(blobs)
    for got, want in zip(by_pool, by_thread, strict=True):
        assert type(got) is type(want)
        if isinstance(want, FailedImage):
            assert got == want  # the same reason, word for word
            continue
        assert isinstance(got, PreparedImage)
        assert got.facts == want.facts  # sizes, format, bytes, blur and brightness
        assert isinstance(got.pixels, torch.Tensor) and isinstance(want.pixels, torch.Tensor)
        assert got.pixels.dtype == torch.uint8
        assert torch.equal(got.pixels, want.pixels)
    assert sum(isinstance(r, FailedImage) for r in by_pool) == 3


def test_a_dying_process_fails_only_the_image_that_killed_it(pool: DecodePool) -> None:
    good = [encode(textured(80, 60, seed=i), "JPEG", quality=90) for i in range(12)]
    blobs = [*good[:6], KILLER, *good[6:]]

    results = prepared(blobs, pool)

    failed = [r for r in results if isinstance(r, FailedImage)]
    assert [r.position for r in failed] == [6]
    assert "decoder process died" in failed[0].error
    assert all(isinstance(r, PreparedImage) for i, r in enumerate(results) if i != 6)
    assert pool.replaced >= 1
    after = prepared(good[:3], pool)  # the new pool serves
    assert all(isinstance(r, PreparedImage) for r in after)


def test_the_child_needs_no_torch() -> None:
    """A decode process imports Pillow and numpy, not torch: it starts in a fraction of a
    second, and the pixels cross as a plain array."""
    import subprocess
    import sys

    code = "import sys, worker.decode_child; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    got = decode_for_model(encode(textured(30, 20), "JPEG"), "sha", MAX_PIXELS, DRAFT, SIDE)
    assert isinstance(got, DecodedForModel) and isinstance(got.pixels, np.ndarray)


def test_after_close_a_decode_is_a_transient_error_and_no_pool_is_started() -> None:
    """A group still decoding when the worker stops gets a transient error (its jobs are
    retried), not a crash, and no new processes are started behind the stop."""
    from contract.errors import TransientError

    closing = DecodePool(1, max_pixels=MAX_PIXELS, draft_size=DRAFT, side=SIDE)
    closing.close()

    with pytest.raises(TransientError, match="stopping"):
        closing.prepare_many(fetched([encode(textured(30, 20), "JPEG")]))
    assert closing.replaced == 0
