"""What the transformers backends share: loading offline-capable weights, reading features."""

from __future__ import annotations

from typing import Any

import torch


def load_pretrained(name: str, dtype: torch.dtype, device: torch.device) -> Any:
    """`AutoModel.from_pretrained` in the given dtype with SDPA attention where supported.

    Works from a local path or the Hugging Face cache (HF_HUB_OFFLINE=1 makes a missing file fail
    at once instead of waiting on the network).
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load is noise in a worker's log
    try:
        model = AutoModel.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
    except (ValueError, ImportError):  # a model class without SDPA support
        model = AutoModel.from_pretrained(name, dtype=dtype)
    return model.to(device).eval()


def pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns an output object (projected embedding in `pooler_output`);
    4.x returned the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    tensor: torch.Tensor = output.pooler_output
    return tensor
