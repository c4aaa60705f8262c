"""Query vectors for `similar`: a text through the model's text tower, a new image through the
worker's fetch guard, decoder and the model's preprocessing; the model loaded in this process.

An image named by URL is fetched exactly as a listing's would be (`http(s)` through the address
guard, `file://` only under `LV_FILE_ROOTS`). A local path is the operator's own file: it is
read under its own folder as the only file root (so it must be a regular file there, a link
leading elsewhere is refused), then decoded with the same limits.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import torch

from contract.errors import TransientError
from contract.registry import ModelSpec
from contract.settings import Settings
from worker.backends import create_backend
from worker.backends.base import ModelBackend
from worker.image_fetch import FailedImage, fetch_images
from worker.images import PreparedImage, prepare_images
from worker.runtime import fetch_policy


class QueryError(ValueError):
    """The query cannot be embedded (an unusable image, a model without a text tower)."""


def text_vector(spec: ModelSpec, text: str) -> list[float]:
    """The text as written (truncated to the model's context, as titles are)."""
    backend = _loaded(spec)
    if not backend.info.has_text:
        raise QueryError(f"{spec.model_id} has no text tower: search it by listing or image")
    vector: list[float] = backend.embed_texts([text])[0].tolist()
    return vector


def image_vector(settings: Settings, spec: ModelSpec, source: str) -> list[float]:
    """The image at `source` (a URL, or a local path); `QueryError` naming why it is unusable,
    `TransientError` when it could not be fetched now."""
    policy = fetch_policy(settings)
    url = source
    if urlsplit(source).scheme.lower() not in ("http", "https", "file"):
        path = Path(source).expanduser().absolute()
        url = path.as_uri()
        policy = replace(policy, file_roots=(path.parent.resolve(),))
    backend = _loaded(spec)
    with ThreadPoolExecutor(1) as executor:
        try:
            fetched = fetch_images([url], policy, executor)
        except TransientError as error:
            raise TransientError(str(error)) from None
        (prepared,) = prepare_images(
            fetched,
            {},
            preprocess=backend.preprocess,
            max_pixels=settings.max_image_pixels,
            draft_size=max(backend.info.image_size, 256),
            executor=executor,
        )
    if isinstance(prepared, FailedImage):
        raise QueryError(prepared.error)
    # No `encode` was given: the image came decoded, as a tensor.
    assert isinstance(prepared, PreparedImage) and isinstance(prepared.pixels, torch.Tensor)
    vector: list[float] = backend.embed_images(prepared.pixels.unsqueeze(0))[0].tolist()
    return vector


def _loaded(spec: ModelSpec) -> ModelBackend:
    backend = create_backend(spec)
    backend.load()
    return backend
