"""Tiny real models built through the libraries' own save/load code, for tests (no hub)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Two layers of width 32: a real architecture, small enough to build in a test.
TINY_TOWER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


def tiny_open_clip_config(
    *, siglip: bool = False, image_size: int = 32, embed_dim: int = 32
) -> dict:
    """A CLIP-shaped open_clip config small enough to build in well under a second."""
    model_cfg: dict = {
        "embed_dim": embed_dim,
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


def save_tiny_open_clip(
    directory: Path, *, siglip: bool = False, seed: int = 0, embed_dim: int = 32
) -> Path:
    """Write an open_clip `local-dir:` folder with random weights; returns the folder."""
    import open_clip
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_open_clip_config(siglip=siglip, embed_dim=embed_dim)
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


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP BPE vocabulary rebuilt from open_clip's shipped merges file (no hub).

    Same construction as open_clip's SimpleTokenizer: ids equal open_clip's tokenizer's.
    """
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as merges_file:
        lines = merges_file.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges  # type: ignore[return-value]


def _clip_tokenizer(model_max_length: int = 77):  # type: ignore[no-untyped-def]
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_tiny_hf_clip(directory: Path, seed: int = 0) -> Path:
    """A tiny transformers CLIPModel + CLIPProcessor written with save_pretrained."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    torch.manual_seed(seed)
    text = CLIPTextConfig(
        vocab_size=49408,
        **TINY_TOWER,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = CLIPVisionConfig(**TINY_TOWER, image_size=32, patch_size=8)
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16
    )
    CLIPModel(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=_clip_tokenizer()).save_pretrained(
        directory
    )
    return directory


def save_tiny_hf_siglip(directory: Path, seed: int = 0) -> Path:
    """A tiny transformers SiglipModel + SiglipProcessor (text padded to 64, as released)."""
    from transformers import (
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
        SiglipTextConfig,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    text = SiglipTextConfig(
        vocab_size=49408,
        **TINY_TOWER,
        max_position_embeddings=64,
        pad_token_id=49407,
        eos_token_id=49407,
        bos_token_id=49406,
    )
    vision = SiglipVisionConfig(**TINY_TOWER, image_size=32, patch_size=8)
    model = SiglipModel(SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-1.5)
    model.save_pretrained(directory)
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    tokenizer = _clip_tokenizer(model_max_length=64)  # as the released SigLIP tokenizers
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def save_tiny_dinov2(directory: Path, seed: int = 0) -> Path:
    """A tiny transformers Dinov2Model + BitImageProcessor (patch size 14)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=28,
        patch_size=14,
    )
    Dinov2Model(config).save_pretrained(directory)
    BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True
    ).save_pretrained(directory)
    return directory


def load_tiny_backends(root: Path) -> dict[str, Any]:
    """One loaded tiny model per backend kind (open_clip, hf_clip, hf_siglip, hf_dino), saved
    under `root` and loaded through the real loading code, on the default device."""
    from contract.registry import ModelSpec
    from worker.backends import create_backend

    dirs = {
        "open_clip": save_tiny_open_clip(root / "oc"),
        "hf_clip": save_tiny_hf_clip(root / "hf-clip"),
        "hf_siglip": save_tiny_hf_siglip(root / "hf-siglip"),
        "hf_dino": save_tiny_dinov2(root / "hf-dino"),
    }
    loaded = {}
    for kind, path in dirs.items():
        name = f"local-dir:{path}" if kind == "open_clip" else str(path)
        backend = create_backend(ModelSpec("t", kind, name))  # type: ignore[arg-type]
        backend.load()
        loaded[kind] = backend
    return loaded
