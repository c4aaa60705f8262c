"""Model backends: one class per library, each mapping its library onto `embed_images` and
`embed_texts` (`base.ModelBackend` owns loading, device and precision)."""

from __future__ import annotations

from typing import assert_never

from contract.registry import ModelSpec
from worker.backends.base import ModelBackend


def create_backend(spec: ModelSpec, device: str | None = None) -> ModelBackend:
    """An unloaded backend for `spec`; call `.load()` on it (once per worker process). Each
    library is imported only when a registry entry uses it."""
    match spec.backend:
        case "open_clip":
            from worker.backends.openclip import OpenClipBackend

            return OpenClipBackend(spec, device)
        case "hf_clip":
            from worker.backends.hf_dual_encoder import HfClipBackend

            return HfClipBackend(spec, device)
        case "hf_siglip":
            from worker.backends.hf_dual_encoder import HfSiglipBackend

            return HfSiglipBackend(spec, device)
        case "hf_dino":
            from worker.backends.hf_dino import HfDinoBackend

            return HfDinoBackend(spec, device)
        case "sim":
            from worker.backends.sim import SimBackend

            return SimBackend(spec, device)
        case _:
            assert_never(spec.backend)
