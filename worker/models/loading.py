"""Pick the backend class for a registry entry; imports each library only when it is used."""

from __future__ import annotations

import importlib

from worker.models.base import ModelBackend
from worker.models.registry import ModelSpec

_BACKEND_CLASSES = {
    "open_clip": ("worker.models.open_clip_backend", "OpenClipBackend"),
    "hf_clip": ("worker.models.hf_dual_encoder", "HfClipBackend"),
    "hf_siglip": ("worker.models.hf_dual_encoder", "HfSiglipBackend"),
    "hf_dino": ("worker.models.hf_dino", "HfDinoBackend"),
}


def create_backend(spec: ModelSpec, device: str | None = None) -> ModelBackend:
    """An unloaded backend for `spec`; call `.load()` on it (once per worker process)."""
    module_name, class_name = _BACKEND_CLASSES[spec.backend]
    backend_class = getattr(importlib.import_module(module_name), class_name)
    backend: ModelBackend = backend_class(spec, device)
    return backend
