"""`train` on a GPU: mixed precision (bf16 autocast, or fp16 with a GradScaler) and a model that
loads back through its backend, for open_clip and transformers CLIP."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.registry import ModelSpec
from contract.settings import Settings
from listing_vision.training import TrainConfig, TrainRequest, train
from tests.tiny_models import save_tiny_hf_clip, save_tiny_open_clip
from tests.training_data import labelled_pairs
from worker.backends import create_backend


@pytest.mark.parametrize(
    ("backend", "precision"), [("open_clip", "auto"), ("open_clip", "fp16"), ("hf_clip", "auto")]
)
def test_training_on_the_gpu_uses_mixed_precision(
    backend: str, precision: str, tmp_path: Path
) -> None:
    if backend == "open_clip":
        base = ModelSpec("tiny", "open_clip", f"local-dir:{save_tiny_open_clip(tmp_path / 'b')}")
    else:
        base = ModelSpec("tiny", "hf_clip", str(save_tiny_hf_clip(tmp_path / "b")))
    said: list[str] = []
    config = TrainConfig(epochs=6, batch_size=12, lr=1e-3, patience=3, loader_workers=2)
    request = TrainRequest(
        base,
        labelled_pairs(tmp_path / "data"),
        tmp_path / "out",
        val_split=0.25,
        precision=precision,
        config=config,
    )

    report = train(Settings(home=tmp_path / "home"), request, said.append)

    assert any(f"; cuda, {'fp16' if precision == 'fp16' else 'bf16'}" in line for line in said)
    assert report.after.roc_auc is not None and report.before.roc_auc is not None
    assert report.after.roc_auc > report.before.roc_auc
    loaded = create_backend(report.spec)
    loaded.load()
    assert loaded.device.type == "cuda"
