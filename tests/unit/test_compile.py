"""`compile` in a registry entry: the image tower is compiled by torch.compile (inductor) at
load, for any batch size, and embeds as the eager model does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from contract.registry import ModelSpec
from tests.tiny_models import save_tiny_open_clip
from worker.backends import create_backend


def test_a_compiled_image_tower_embeds_as_the_eager_one(tmp_path: Path) -> None:
    """One real compile (tens of seconds on two cores): the cost `compile` moves to load."""
    spec = ModelSpec("m", "open_clip", f"local-dir:{save_tiny_open_clip(tmp_path / 'oc')}")
    eager = create_backend(spec, "cpu")
    compiled = create_backend(dataclasses.replace(spec, compile="default"), "cpu")
    info = eager.load()
    compiled.load()
    assert compiled._image_tower is not compiled._embed_images  # compiled at load
    assert eager._image_tower == eager._embed_images

    for batch in (1, 3, 8):  # dynamic batch sizes: no recompile needed per size
        pixels = torch.randn(batch, 3, info.image_size, info.image_size)
        want, got = eager.embed_images(pixels), compiled.embed_images(pixels)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-4)
    texts = ["a red handbag", "a lamp"]
    assert torch.equal(compiled.embed_texts(texts), eager.embed_texts(texts))
