"""A simulated accelerator for benchmarks (`backend = "sim"`, never in the built-in registry).

Each image or text call sleeps for the batch latency an H100 showed for the named model
(DEVELOPERS.md: bf16 images/s at batch 256, or 128 for 378 px; naive fp32 images/s at batch 1),
as a fixed cost plus a cost per item, and releases the GIL while it sleeps, like a CUDA kernel
wait. So a benchmark on a CPU machine shows whether fetch, decode, Celery and PostgreSQL keep
such a device busy. Preprocessing is real (open_clip's transform at the model's input size): on
a GPU host that work is the CPU's too. Embeddings are a fixed random projection of the pixels,
deterministic and cheap; texts are hashed to vectors. Nothing here is a model's math.

On the tensor input path (`LV_INPUT_PATH=tensor`, as on a GPU host) the host decodes, resizes and
crops for real; the last step, normalising the uint8 batch, is the device's: an H100 does it for
a 378-px batch of 128 in well under a millisecond, so the sim counts it as device time and
normalises only the 8x8 grid its embedding reads (the same numbers the PIL path gives).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
from PIL import Image

from contract.registry import ModelSpec
from worker.backends.base import ModelBackend, ModelInfo
from worker.tensor_input import InputSpec, input_spec_from_open_clip, normalise

# A text batch costs this share of an image batch of the same size (text towers are smaller;
# DEVELOPERS.md has no text figures, so this is a stated assumption, not a measurement).
TEXT_COST_SHARE = 0.25


@dataclass(frozen=True)
class SimulatedModel:
    """H100 figures for one model: `big_batch` images/s at batch `big`, `single` at batch 1."""

    image_size: int
    embed_dim: int
    big_batch: float
    big: int
    single: float
    has_text: bool = True
    scoring: str = "cosine"

    def per_item(self) -> float:
        return (self.big / self.big_batch - 1 / self.single) / (self.big - 1)

    def fixed(self) -> float:
        return max(0.0, 1 / self.single - self.per_item())

    def seconds(self, items: int, share: float = 1.0) -> float:
        """The batch latency: fixed cost plus a cost per item (linear in batch size)."""
        return self.fixed() + share * self.per_item() * items


SIMULATED: dict[str, SimulatedModel] = {
    "ViT-B-32": SimulatedModel(224, 512, 30_470, 256, 249),
    "ViT-L-14": SimulatedModel(224, 768, 2_652, 256, 109),
    "ViT-H-14-378-quickgelu": SimulatedModel(378, 1024, 410, 128, 31),
    "DINOv2-base": SimulatedModel(224, 768, 6_712, 256, 148, has_text=False),
    "DINOv2-large": SimulatedModel(224, 1024, 2_418, 256, 76, has_text=False),
    "ViT-gopt-16-SigLIP2-384": SimulatedModel(384, 1536, 283, 256, 23, scoring="sigmoid"),
    "PE-Core-bigG-14-448": SimulatedModel(448, 1280, 91, 256, 8.6),
}
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


class SimBackend(ModelBackend):
    """Sleeps like the named model on an H100; `name` is a key of `SIMULATED`. It runs on the
    CPU unless told otherwise, on a CUDA host too: the device it stands for is simulated, and
    its rows measure the host's side of the pipeline, comparable from host to host."""

    def __init__(self, spec: ModelSpec, device: str | torch.device | None = None) -> None:
        super().__init__(spec, device or "cpu")

    def _load(self) -> ModelInfo:
        if self.spec.name not in SIMULATED:
            known = ", ".join(sorted(SIMULATED))
            raise ValueError(f"sim backend: unknown model {self.spec.name!r} (known: {known})")
        import open_clip  # its transform is the preprocessing a CLIP worker really runs

        self.sim = SIMULATED[self.spec.name]
        self._transform = open_clip.image_transform(self.sim.image_size, False, _MEAN, _STD)
        generator = torch.Generator().manual_seed(0)
        self._projection = torch.randn(3 * 8 * 8, self.sim.embed_dim, generator=generator)
        self.slept = 0.0
        return ModelInfo(
            embed_dim=self.sim.embed_dim,
            has_text=self.sim.has_text,
            scoring="sigmoid" if self.sim.scoring == "sigmoid" else "cosine",
            logit_scale=100.0 if self.sim.scoring == "cosine" else 10.0,
            logit_bias=0.0 if self.sim.scoring == "cosine" else -10.0,
            image_size=self.sim.image_size,
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)

    def input_spec(self) -> InputSpec | None:
        return input_spec_from_open_clip(self._transform)

    def model_input(self, batch: torch.Tensor, spec: InputSpec) -> torch.Tensor:
        # The device's normalise pass, simulated: only the grid `_embed_images` reads.
        return normalise(_grid(batch).contiguous(), spec, self.dtype)

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        grid = _grid(pixels).float().flatten(1)
        out = grid @ self._projection
        self._sleep_until(started + self.sim.seconds(len(pixels)))
        return out

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        started = time.perf_counter()
        rows = [_text_vector(text, self.sim.embed_dim) for text in texts]
        self._sleep_until(started + self.sim.seconds(len(texts), TEXT_COST_SHARE))
        return torch.stack(rows)

    def _sleep_until(self, deadline: float) -> None:
        remaining = deadline - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)  # releases the GIL, as a device wait does
            self.slept += remaining


def _grid(pixels: torch.Tensor) -> torch.Tensor:
    """An 8x8 grid of an (N, 3, H, W) batch's pixels, not a pooled mean: it must cost next to
    nothing on the CPU. An 8x8 batch is its own grid."""
    step = max(1, pixels.shape[-1] // 8)
    return pixels[:, :, ::step, ::step][:, :, :8, :8]


def _text_vector(text: str, dim: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed & (2**63 - 1)))
