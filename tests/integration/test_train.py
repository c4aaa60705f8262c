"""`listing-vision train`: fine-tunes a model the registry can then name and load."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from contract.registry import ModelSpec, get_spec, load_registry
from listing_vision.training import TrainConfig, TrainingError, read_pairs, train_open_clip
from tests import images
from worker.backends import create_backend

COLOURS = ["red", "blue", "green", "gold"]
SHAPES = ["circle", "square", "triangle"]


def write_pairs(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            name = f"{colour}-{shape}.png"
            images.save(images.product_image(colour, shape), directory / name, "PNG")
            rows.append((name, f"a {colour} {shape}"))
    path = directory / "pairs.csv"
    with path.open("w", newline="") as file:
        csv.writer(file).writerows([("image", "text"), *rows])
    return path


def test_training_lowers_the_loss_and_writes_a_loadable_model(
    model_dir: Path, tmp_path: Path
) -> None:
    pairs = read_pairs(write_pairs(tmp_path / "data"))
    spec = ModelSpec("tiny", "open_clip", f"local-dir:{model_dir}")
    out = tmp_path / "tuned"
    report = train_open_clip(
        spec, pairs, out, TrainConfig(epochs=8, batch_size=12, lr=1e-3), log=lambda _: None
    )
    assert report.last_loss < report.first_loss
    before = load_file(str(model_dir / "open_clip_model.safetensors"))
    after = load_file(str(out / "open_clip_model.safetensors"))
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    tuned = create_backend(ModelSpec("tuned", "open_clip", f"local-dir:{out}"))
    info = tuned.load()
    assert info.embed_dim == 32


def test_train_command_prints_a_registry_entry_that_loads(
    models_file: Path, tmp_path: Path
) -> None:
    csv_path = write_pairs(tmp_path / "data")
    out = tmp_path / "tuned"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LV_")}
    env.update(LV_MODELS_FILE=str(models_file), LV_HOME=str(tmp_path / "home"))
    command = [
        *(sys.executable, "-m", "listing_vision", "train", "--pairs", str(csv_path)),
        *("--out", str(out), "--model", "tiny", "--epochs", "2", "--batch-size", "6"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    snippet = done.stdout[done.stdout.index("[models.tiny-finetuned]") :]
    registry_file = tmp_path / "more.toml"
    registry_file.write_text(snippet)
    spec = get_spec(load_registry(registry_file), "tiny-finetuned")
    assert spec.name == f"local-dir:{out}" and spec.threshold == pytest.approx(0.1)


def test_pairs_file_errors_name_the_line(tmp_path: Path) -> None:
    bad_header = tmp_path / "a.csv"
    bad_header.write_text("path,caption\nx.png,y\n")
    with pytest.raises(TrainingError, match="image and text"):
        read_pairs(bad_header)
    missing = tmp_path / "b.csv"
    missing.write_text("image,text\nnope.png,a caption\nnope2.png,b\n")
    with pytest.raises(TrainingError, match=r"b.csv:2: no such image"):
        read_pairs(missing)


def test_hub_models_are_refused_with_advice(tmp_path: Path) -> None:
    spec = ModelSpec("hub", "open_clip", "hf-hub:timm/some-model")
    with pytest.raises(TrainingError, match="download"):
        train_open_clip(spec, [(tmp_path / "a.png", "a")] * 2, tmp_path / "out")
