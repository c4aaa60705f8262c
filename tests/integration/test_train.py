"""`listing-vision train`: fine-tunes a model, keeps the best epoch by validation loss, stops on
divergence, calibrates a threshold and prints a registry entry that loads and scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from contract.registry import ModelSpec, get_spec, load_registry
from contract.settings import Settings
from listing_vision.toolkit.metrics import detection_at
from listing_vision.training import Diverged, TrainConfig, TrainingError, TrainRequest, train
from listing_vision.training.data import Example, read_training_data, split_validation
from listing_vision.training.trainable import load_trainable
from tests import images
from tests.tiny_models import save_tiny_hf_clip, save_tiny_hf_siglip
from tests.training_data import (
    COLOURS,
    contrastive_pairs,
    draw,
    labelled_pairs,
    next_of,
    write_csv,
)
from worker.backends import create_backend
from worker.scoring import image_text_similarity

QUIET = TrainConfig(batch_size=12, lr=1e-3)


def settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(home=tmp_path / "home", **values)  # type: ignore[arg-type]


def open_clip_spec(model_dir: Path) -> ModelSpec:
    return ModelSpec("tiny", "open_clip", f"local-dir:{model_dir}", threshold=0.1)


def test_the_best_epoch_by_validation_loss_is_kept_when_later_ones_get_worse(
    model_dir: Path, tmp_path: Path
) -> None:
    # Validation pairs contradict training (each drawing titled with another colour): once the
    # model has learnt the shapes, every epoch that learns the colours makes validation worse.
    train_file = contrastive_pairs(tmp_path / "data")
    val_file = contrastive_pairs(tmp_path / "data", "val.csv", wrong=True)
    out = tmp_path / "tuned"
    config = TrainConfig(epochs=8, batch_size=12, lr=1e-3, patience=2)
    request = TrainRequest(open_clip_spec(model_dir), train_file, out, val=val_file, config=config)

    report = train(settings(tmp_path), request, log=lambda _: None)

    fit = report.fit
    losses = {e.epoch: e.val_loss for e in fit.epochs}
    last = max(losses)
    assert fit.best.val_loss == min(losses.values())
    assert fit.best.epoch < last and fit.stopped_early  # a later epoch was worse: stopped early
    assert last - fit.best.epoch == 2  # patience
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        f"epoch-{fit.best.epoch:03d}",
        f"epoch-{last:03d}",
    ]  # only the best and the latest stay
    kept = load_file(str(out / "open_clip_model.safetensors"))
    best = load_file(str(checkpoints / f"epoch-{fit.best.epoch:03d}/open_clip_model.safetensors"))
    latest = load_file(str(checkpoints / f"epoch-{last:03d}/open_clip_model.safetensors"))
    assert all(torch.equal(kept[k], best[k]) for k in kept)
    assert any(not torch.equal(kept[k], latest[k]) for k in kept)
    record = json.loads((out / "training.json").read_text())
    assert record["best_epoch"] == fit.best.epoch
    assert [e["val_loss"] for e in record["epochs"]] == [losses[e] for e in sorted(losses)]
    assert record["after"]["threshold"] == report.spec.threshold


def test_labelled_pairs_with_negatives_separate_matches_from_mismatches(
    model_dir: Path, tmp_path: Path
) -> None:
    data = labelled_pairs(tmp_path / "data")
    out = tmp_path / "tuned"
    config = TrainConfig(epochs=6, batch_size=12, lr=1e-3, patience=3)
    request = TrainRequest(open_clip_spec(model_dir), data, out, val_split=0.25, config=config)

    report = train(settings(tmp_path), request, log=lambda _: None)

    before, after = report.before, report.after
    assert after.scored == before.scored == 18 and after.mismatches == 9  # 3 drawings held out
    assert before.roc_auc is not None and after.roc_auc is not None
    assert after.roc_auc >= 0.9 > before.roc_auc
    assert after.best.f1 > before.best.f1
    # The same, measured directly: the saved model, loaded by its backend, on the held-out pairs.
    _, held_out = split_validation(read_training_data(data, settings(tmp_path)).examples, 0.25, 0)
    mismatch = [bool(e.mismatch) for e in held_out]
    tuned = similarities(report.spec, held_out)
    assert gap(tuned, mismatch) > gap(similarities(open_clip_spec(model_dir), held_out), mismatch)
    # The printed threshold is the best F1 on them, and the kept model the best epoch.
    assert report.spec.threshold == after.threshold
    assert detection_at(tuned, mismatch, after.threshold).f1 == pytest.approx(after.best.f1)
    assert report.fit.best.val_loss == min(e.val_loss for e in report.fit.epochs)
    kept = load_file(str(out / "open_clip_model.safetensors"))
    best = load_file(str(report.fit.best_dir / "open_clip_model.safetensors"))
    assert all(torch.equal(kept[k], best[k]) for k in kept)


def similarities(spec: ModelSpec, examples: list[Example]) -> list[float]:
    """Each pair's similarity, from the model loaded through its backend."""
    backend = create_backend(spec)
    info = backend.load()
    found = []
    for example in examples:
        image = Image.open(example.images[0]).convert("RGB")
        vector = backend.embed_images(backend.preprocess(image).unsqueeze(0))
        text = backend.embed_texts([example.text])[0]
        found.append(float(image_text_similarity(vector, text, info)[0]))
    return found


def gap(scores: list[float], mismatch: list[bool]) -> float:
    """Mean similarity of the matching pairs minus that of the mismatches."""
    matches = [s for s, m in zip(scores, mismatch, strict=True) if not m]
    mismatches = [s for s, m in zip(scores, mismatch, strict=True) if m]
    return sum(matches) / len(matches) - sum(mismatches) / len(mismatches)


def test_labelled_listings_train_on_their_best_image(model_dir: Path, tmp_path: Path) -> None:
    drawn = draw(tmp_path / "images", variants=2)
    lines = []
    for number, (file, colour, shape) in enumerate(drawn):
        other = tmp_path / "images" / drawn[(number + 5) % len(drawn)][0]
        urls = [(tmp_path / "images" / file).as_uri(), other.as_uri()]
        label = "match" if number % 2 == 0 else "mismatch"
        said_colour = colour if label == "match" else next_of(COLOURS, colour)
        title = f"a {said_colour} {shape}"
        lines.append(
            {"listing_id": f"sku-{number}", "title": title, "image_urls": urls, "label": label}
        )
    lines[3]["image_urls"] = [(tmp_path / "images/missing.png").as_uri()]
    data = tmp_path / "labelled.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    said: list[str] = []
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-3)
    request = TrainRequest(
        open_clip_spec(model_dir), data, tmp_path / "out", val_split=0.25, config=config
    )

    report = train(settings(tmp_path, file_roots=(tmp_path / "images",)), request, log=said.append)

    assert any("1 listing(s) left out" in line and "line 4 (sku-3)" in line for line in said)
    record = json.loads((tmp_path / "out/training.json").read_text())
    assert record["examples"]["training"] + record["examples"]["validation"] == len(lines) - 1
    assert record["data"]["kind"] == "labelled pairs"
    assert report.after.scored == record["examples"]["validation"]


def test_an_absurd_learning_rate_stops_training_as_diverged(
    model_dir: Path, tmp_path: Path
) -> None:
    data = contrastive_pairs(tmp_path / "data")
    out = tmp_path / "tuned"
    config = TrainConfig(epochs=5, batch_size=4, lr=1e30)
    request = TrainRequest(open_clip_spec(model_dir), data, out, val_split=0.25, config=config)

    with pytest.raises(Diverged, match=r"diverged in epoch 1, step \d+: the training loss is nan"):
        train(settings(tmp_path), request, log=lambda _: None)

    assert not (out / "open_clip_model.safetensors").exists()  # no model is kept
    assert not (out / "training.json").exists()


def test_train_command_exits_1_when_training_diverges(models_file: Path, tmp_path: Path) -> None:
    data = contrastive_pairs(tmp_path / "data")
    out = tmp_path / "tuned"
    command = [
        *(sys.executable, "-m", "listing_vision", "train", "--pairs", str(data)),
        *("--out", str(out), "--model", "tiny", "--lr", "1e30", "--batch-size", "4"),
        *("--val-split", "0.25", "--workers", "0"),
    ]

    env = cli_env(models_file, tmp_path)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 1, done.stderr
    assert "training stopped: training diverged in epoch 1" in done.stderr
    assert "lower --lr" in done.stderr and "[models." not in done.stdout


def cli_env(models_file: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LV_")}
    env.update(LV_MODELS_FILE=str(models_file), LV_HOME=str(tmp_path / "home"))
    return env


@pytest.mark.parametrize("backend", ["hf_clip", "hf_siglip"])
def test_transformers_models_train_and_load_through_their_backend(
    backend: str, tmp_path: Path
) -> None:
    save = save_tiny_hf_clip if backend == "hf_clip" else save_tiny_hf_siglip
    base_dir = save(tmp_path / "base")
    base = ModelSpec("tiny-hf", backend, str(base_dir))  # type: ignore[arg-type]
    data = labelled_pairs(tmp_path / "data")
    out = tmp_path / "tuned"
    config = TrainConfig(epochs=2, batch_size=12, lr=1e-3)

    report = train(settings(tmp_path), TrainRequest(base, data, out, config=config), lambda _: None)

    assert report.spec.backend == backend and report.spec.name == str(out)
    before = load_file(str(base_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    loaded = create_backend(report.spec)
    info = loaded.load()
    assert info.scoring == ("sigmoid" if backend == "hf_siglip" else "cosine")
    assert report.after.roc_auc is not None


def test_train_command_prints_a_registry_entry_that_loads_and_scores(
    models_file: Path, tmp_path: Path
) -> None:
    data = contrastive_pairs(tmp_path / "data")
    out = tmp_path / "tuned"
    env = cli_env(models_file, tmp_path)
    command = [
        *(sys.executable, "-m", "listing_vision", "train", "--pairs", str(data)),
        *("--out", str(out), "--model", "tiny", "--epochs", "2", "--batch-size", "6"),
        *("--val-split", "0.25", "--workers", "1"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr
    assert "epoch 2/2" in done.stdout and "ROC AUC" in done.stdout
    snippet = done.stdout[done.stdout.index("[models.tiny-finetuned]") :]
    registry_file = tmp_path / "more.toml"
    registry_file.write_text(snippet)
    spec = get_spec(load_registry(registry_file), "tiny-finetuned")
    record = json.loads((out / "training.json").read_text())
    assert spec.name == f"local-dir:{out}" and spec.backend == "open_clip"
    assert spec.threshold == record["after"]["threshold"]
    backend = create_backend(spec)
    info = backend.load()
    pixels = backend.preprocess(images.product_image("red", "circle")).unsqueeze(0)
    score = image_text_similarity(
        backend.embed_images(pixels), backend.embed_texts(["a red circle"])[0], info
    )
    assert -1.0 <= float(score[0]) <= 1.0

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_bad_training_files_exit_2_naming_the_line(models_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    draw(data)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = write_csv(
        data / "bad.csv",
        ("image", "text", "label"),
        [
            ("red-circle-0.png", "a red circle", "match"),
            ("blue-square-0.png", "a blue square", "yes"),
            ("nope.png", "a gold triangle", "mismatch"),
            ("broken.png", "a green circle", "match"),
        ],
    )
    env = cli_env(models_file, tmp_path)
    command = [sys.executable, "-m", "listing_vision", "train", "--model", "tiny"]

    done = subprocess.run(
        [*command, "--pairs", str(bad), "--out", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 2, done.stderr
    assert "3 bad line(s)" in done.stderr
    assert f'{bad}:3: label must be "match" or "mismatch"' in done.stderr
    assert f"{bad}:4: no such image" in done.stderr
    assert f"{bad}:5: image {data / 'broken.png'}" in done.stderr
    assert not (tmp_path / "out").exists()


def test_training_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    def refused(name: str, content: str) -> str:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(TrainingError) as caught:
            read_training_data(path, settings(tmp_path))
        return str(caught.value)

    assert "a.csv:1: the header must name the columns image and text" in refused(
        "a.csv", "path,caption\nx.png,y\n"
    )
    assert "b.csv:2: no such image" in refused("b.csv", "image,text\nnope.png,a\nnope2.png,b\n")
    assert "c.csv:3: image and text are both required" in refused(
        "c.csv", "image,text\nnope.png,a\n,b\n"
    )
    event = {"listing_id": "sku-1", "title": "t", "image_urls": ["https://example.com/a.jpg"]}
    lines = [json.dumps({**event, "label": "match"}), json.dumps({**event, "label": "maybe"})]
    message = refused("d.jsonl", "\n".join(lines) + "\n")
    assert "line 2 (sku-1)" in message and "label" in message


def test_validation_must_be_the_same_kind_as_training(model_dir: Path, tmp_path: Path) -> None:
    request = TrainRequest(
        open_clip_spec(model_dir),
        contrastive_pairs(tmp_path / "data"),
        tmp_path / "out",
        val=labelled_pairs(tmp_path / "data"),
        config=QUIET,
    )
    with pytest.raises(TrainingError, match="both must be of one kind"):
        train(settings(tmp_path), request, log=lambda _: None)


def test_hub_models_are_refused_with_advice() -> None:
    spec = ModelSpec("hub", "open_clip", "hf-hub:timm/some-model")
    with pytest.raises(TrainingError, match="download"):
        load_trainable(spec, torch.device("cpu"))
