"""On a GPU the backend runs in bf16 and agrees with open_clip's fp32 reference."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from contract.registry import ModelSpec
from tests.tiny_models import save_tiny_open_clip
from worker.backends import create_backend


def test_open_clip_backend_uses_bf16_on_gpu_and_matches_fp32(tmp_path: Path) -> None:
    import open_clip

    directory = save_tiny_open_clip(tmp_path / "tiny")
    backend = create_backend(ModelSpec("tiny", "open_clip", f"local-dir:{directory}"))
    backend.load()
    assert backend.device.type == "cuda" and backend.dtype == torch.bfloat16
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    got = backend.embed_images(backend.preprocess(image)[None])[0]
    reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    with torch.no_grad():
        want = reference.eval().encode_image(preprocess(image)[None], normalize=True)[0]
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99
