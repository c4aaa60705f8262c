"""`train` from start to end: read and split the data, fine-tune, keep the best epoch, calibrate
its threshold on the validation data, and say what to add to the registry.

The output folder is the model (the best epoch's files, loadable as the registry names it),
with `checkpoints/` (the best and the latest epoch) and `training.json` (what was done, on what
data, with which result) beside it.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from contract.errors import one_line
from contract.registry import ModelSpec, RegistryError, get_spec, load_registry
from contract.settings import Settings
from listing_vision.training.amp import choose_device, choose_precision
from listing_vision.training.data import (
    Example,
    TrainingData,
    check_usable,
    read_training_data,
    split_validation,
)
from listing_vision.training.entry import finetuned_spec, registry_entry
from listing_vision.training.errors import TrainingError
from listing_vision.training.loop import FitResult, Objective, TrainConfig, fit
from listing_vision.training.trainable import Trainable, load_trainable
from listing_vision.training.validation import Separation, measure, validation_pairs

RECORD = "training.json"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class TrainRequest:
    """What to train, on what, and where to put it (`val` wins over `val_split`)."""

    base: ModelSpec
    data: Path
    out: Path
    val: Path | None = None
    val_split: float = 0.1
    model_id: str | None = None  # the new registry id; default "<base>-finetuned"
    device: str | None = None  # default: the GPU when there is one
    precision: str = "auto"  # auto, fp32, bf16 or fp16
    overwrite: bool = False  # replace a folder an earlier `train` wrote
    config: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class TrainReport:
    """The trained model and the evidence for it."""

    spec: ModelSpec  # the registry entry, threshold calibrated
    entry: str  # the same as TOML
    fit: FitResult
    before: Separation  # the base model on the validation pairs
    after: Separation  # the kept epoch, loaded as the registry loads it
    synthetic_negatives: bool

    @property
    def out_dir(self) -> Path:
        return Path(self.spec.name.removeprefix("local-dir:"))


def train(
    settings: Settings, request: TrainRequest, log: Callable[[str], None] = print
) -> TrainReport:
    """Run `request`; `TrainingError` for unusable input, `Diverged` if the loss blows up."""
    out = request.out.expanduser().resolve()
    data = read_training_data(request.data, settings)
    _report_left_out(data, log)
    train_set, val_set = _split(data, request, settings, log)
    _prepare_out(out, request.overwrite)
    device = choose_device(request.device)
    amp = choose_precision(request.precision, device)
    log(
        f"training {request.base.model_id} on {_counted(train_set)}, validating on "
        f"{_counted(val_set)}; {device.type}, {amp.name}"
    )
    trainable = _load(request.base, device)
    initial = request.base.threshold if request.base.threshold is not None else 0.0
    objective = Objective(trainable, data.labelled, initial)
    config = replace(request.config, max_image_pixels=settings.max_image_pixels)
    result = fit(trainable, objective, train_set, val_set, config, amp, out / CHECKPOINTS, log)
    _install(result.best_dir, out)
    spec = finetuned_spec(
        request.base,
        request.model_id or f"{request.base.model_id}-finetuned",
        trainable.registry_name(out),
        0.0,
    )
    _release(trainable)
    log("scoring the validation pairs as a worker would, with the base and the kept model")
    pairs = validation_pairs(val_set)
    before = measure(settings, request.base, pairs)
    after = measure(settings, spec, pairs)
    spec = replace(spec, threshold=after.threshold)
    entry = _checked_entry(spec)
    report = TrainReport(spec, entry, result, before, after, pairs.synthetic_negatives)
    _write_record(out, request, data, report, device.type, amp.name, len(train_set), len(val_set))
    return report


def _prepare_out(out: Path, overwrite: bool) -> None:
    """A new or empty folder; with `overwrite`, one an earlier `train` wrote. Never anything
    else: the folder is replaced by the model."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (overwrite and (out / RECORD).is_file()):
            hint = (
                "pass --overwrite to replace a model train wrote there"
                if (out / RECORD).is_file()
                else "choose an empty or new folder"
            )
            raise TrainingError(f"--out {out} is not empty; {hint}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _split(
    data: TrainingData, request: TrainRequest, settings: Settings, log: Callable[[str], None]
) -> tuple[list[Example], list[Example]]:
    if request.val is not None:
        val_data = read_training_data(request.val, settings)
        _report_left_out(val_data, log)
        if val_data.labelled != data.labelled:
            raise TrainingError(
                f"{request.val} holds {val_data.kind} and {request.data} {data.kind}: "
                "validation is measured with the training loss, so both must be of one kind"
            )
        train_set, val_set = data.examples, val_data.examples
    else:
        if not 0 < request.val_split < 1:
            raise TrainingError("--val-split must be between 0 and 1 (exclusive)")
        train_set, val_set = split_validation(data.examples, request.val_split, request.config.seed)
    check_usable(train_set, "training")
    check_usable(val_set, "validation")
    shared = _images(train_set) & _images(val_set)
    if shared:
        log(
            f"warning: {len(shared)} validation image(s) are also training images: the "
            "validation loss and threshold will be optimistic"
        )
    return train_set, val_set


def _images(examples: Sequence[Example]) -> set[Path]:
    return {path for example in examples for path in example.images}


def _counted(examples: Sequence[Example]) -> str:
    if examples[0].mismatch is None:
        return f"{len(examples)} contrastive pairs"
    mismatches = sum(bool(e.mismatch) for e in examples)
    return f"{len(examples)} labelled pairs ({mismatches} mismatches)"


def _report_left_out(data: TrainingData, log: Callable[[str], None]) -> None:
    if not data.left_out:
        return
    shown = "\n  ".join(data.left_out[:5])
    log(f"{data.path}: {len(data.left_out)} listing(s) left out, no usable image:\n  {shown}")


def _load(spec: ModelSpec, device: torch.device) -> Trainable:
    try:
        return load_trainable(spec, device)
    except TrainingError:
        raise
    except Exception as error:  # weights missing offline, a bad path, a bad config
        raise TrainingError(
            f"cannot load {spec.model_id} ({spec.name}): {one_line(error)}"
        ) from None


def _install(best_dir: Path, out: Path) -> None:
    """The best epoch's model files become the output folder's."""
    for item in best_dir.iterdir():
        if item.is_file() and item.name != "checkpoint.json":
            shutil.copy2(item, out / item.name)


def _release(trainable: Trainable) -> None:
    """Free the training copy (and its GPU memory) before the validation models load."""
    trainable.model.to("cpu")
    del trainable.model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _checked_entry(spec: ModelSpec) -> str:
    """The TOML entry, read back by the registry's own parser before it is shown."""
    entry = registry_entry(spec)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "entry.toml"
        path.write_text(entry)
        try:
            parsed = get_spec(load_registry(path), spec.model_id)
        except RegistryError as error:
            raise TrainingError(f"the registry entry would not load: {error}") from None
    if replace(parsed, source=spec.source) != spec:
        raise AssertionError(f"the registry entry does not read back as written:\n{entry}")
    return entry


def _write_record(
    out: Path,
    request: TrainRequest,
    data: TrainingData,
    report: TrainReport,
    device: str,
    precision: str,
    train_count: int,
    val_count: int,
) -> None:
    record = {
        "base_model": {"id": request.base.model_id, "name": request.base.name},
        "data": {"path": str(data.path), "sha256": data.sha256, "kind": data.kind},
        "validation": str(request.val) if request.val else f"split {request.val_split:g}",
        "examples": {"training": train_count, "validation": val_count},
        "left_out": data.left_out,
        "device": device,
        "precision": precision,
        "config": asdict(request.config),
        "baseline_val_loss": report.fit.baseline_val_loss,
        "epochs": [asdict(e) for e in report.fit.epochs],
        "best_epoch": report.fit.best.epoch,
        "stopped_early": report.fit.stopped_early,
        "synthetic_negatives": report.synthetic_negatives,
        "before": _separation(report.before),
        "after": _separation(report.after),
        "registry_entry": report.entry,
    }
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _separation(found: Separation) -> dict[str, object]:
    best = found.best
    return {
        "model": found.model_id,
        "scored": found.scored,
        "mismatches": found.mismatches,
        "unscored": found.unscored,
        "roc_auc": found.roc_auc,
        "threshold": best.threshold,
        "precision": best.precision,
        "recall": best.recall,
        "f1": best.f1,
    }
