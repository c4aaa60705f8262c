"""What every model backend is, and the one place that owns device, precision and warm loading.

A backend subclass writes only `_load`, `preprocess`, `_embed_images` and `_embed_texts`; this base
handles the device, the dtype, `torch.inference_mode`, normalisation and loading once behind a
lock. Embedding calls are not locked: the worker makes them from its batcher's one thread.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image

from contract.registry import ModelSpec
from worker.tensor_input import InputSpec, normalise, to_device

Scoring = Literal["cosine", "sigmoid"]


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model that scoring and storage need."""

    embed_dim: int
    has_text: bool
    scoring: Scoring
    logit_scale: float  # already exponentiated: the temperature applied to cosines
    logit_bias: float
    image_size: int


def image_text_info(model: Any, *, embed_dim: int, image_size: int) -> ModelInfo:
    """Facts of an image-text model: a `logit_bias` parameter makes it SigLIP-style (sigmoid
    scoring), decided from the model itself, never from its name."""
    bias = getattr(model, "logit_bias", None)
    return ModelInfo(
        embed_dim=embed_dim,
        has_text=True,
        scoring="sigmoid" if bias is not None else "cosine",
        logit_scale=float(model.logit_scale.exp().item()),
        logit_bias=float(bias.item()) if bias is not None else 0.0,
        image_size=image_size,
    )


class ModelBackend(ABC):
    """A warm model: load once (from any thread), then embed image and text batches."""

    def __init__(self, spec: ModelSpec, device: str | torch.device | None = None) -> None:
        self.spec = spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _choose_dtype(spec.precision, self.device)
        self._load_lock = threading.Lock()
        self._info: ModelInfo | None = None
        self._image_tower: Callable[[torch.Tensor], torch.Tensor] = self._embed_images

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError(f"model {self.spec.model_id} is not loaded; call load() first")
        return self._info

    def load(self) -> ModelInfo:
        """Load weights once (two threads may ask at the same time) and warm the model up."""
        with self._load_lock:
            if self._info is None:
                with torch.inference_mode():
                    info = self._load()
                    if self.spec.compile != "off":
                        self._compile_image_tower(info)
                    self._info = info
        return self._info

    def _compile_image_tower(self, info: ModelInfo) -> None:
        """`torch.compile` the image tower (the registry's `compile`), with dynamic batch
        sizes, and run it once here: the compile happens at load, not in the first job. Only
        the image tower: the text towers tokenise in Python first."""
        mode = None if self.spec.compile == "default" else self.spec.compile
        compiled = torch.compile(self._embed_images, mode=mode, dynamic=True)
        side = info.image_size
        compiled(torch.zeros(2, 3, side, side, device=self.device, dtype=self.dtype))
        self._image_tower = compiled

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit-length image embeddings, float32 on the CPU, one row per preprocessed image."""
        with torch.inference_mode():
            batch = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
            return _normalise(self._image_tower(batch))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length text embeddings, float32 on the CPU; overlong texts are truncated."""
        if not self.info.has_text:
            raise TypeError(f"model {self.spec.model_id} has no text encoder")
        with torch.inference_mode():
            return _normalise(self._embed_texts(list(texts)))

    def model_input(self, batch: torch.Tensor, spec: InputSpec) -> torch.Tensor:
        """The tensor path's last step: a uint8 (N, 3, H, W) batch, resized and cropped
        already, rescaled and normalised on the device in the model's dtype."""
        return normalise(to_device(batch, self.device), spec, self.dtype)

    def input_spec(self) -> InputSpec | None:
        """What `preprocess` does, for the batched tensor path (`worker.tensor_input`); None
        when it cannot be reproduced there, and callers keep `preprocess`."""
        return None

    @abstractmethod
    def _load(self) -> ModelInfo:
        """Build the model on `self.device` in `self.dtype` and return its facts."""

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB image to the model's input tensor (C, H, W), on the CPU."""

    @abstractmethod
    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw image embeddings for a batch already on the device."""

    @abstractmethod
    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Raw text embeddings for a batch of strings."""


def _normalise(embeddings: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeddings.float(), dim=-1).cpu()


def _choose_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it (fp16 otherwise), fp32 on the CPU, unless the registry says."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16
