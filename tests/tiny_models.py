"""Tiny real models built through the libraries' own save/load code, for tests (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_open_clip_config(*, siglip: bool = False, image_size: int = 32) -> dict:
    """A CLIP-shaped open_clip config small enough to build in well under a second."""
    model_cfg: dict = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": image_size, "patch_size": 8, "width": 64, "layers": 2},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 4,
            "layers": 2,
        },
    }
    if siglip:
        model_cfg["init_logit_bias"] = -1.0
    return {"model_cfg": model_cfg, "preprocess_cfg": {}}


def save_tiny_open_clip(directory: Path, *, siglip: bool = False, seed: int = 0) -> Path:
    """Write an open_clip `local-dir:` folder with random weights; returns the folder."""
    import open_clip
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_open_clip_config(siglip=siglip)
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{directory}", load_weights=False)
    if siglip:
        with torch.no_grad():
            model.logit_scale.fill_(2.0)
            model.logit_bias.fill_(-1.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    return directory
