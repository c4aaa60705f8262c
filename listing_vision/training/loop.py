"""The training loop: epochs of AdamW (warm-up, then cosine decay) with clipped gradients, a
validation loss before training and after every epoch, a checkpoint per epoch, the best one
kept, and two ways to stop early (docs/training.md):

- divergence: a non-finite loss or gradient (or fp16 gradients overflowing step after step)
  raises `Diverged` at once: nothing trained after it can be trusted;
- patience: the validation loss has not improved on the best for `patience` epochs in a row;
  training ends normally with the best epoch.

Only the best epoch's and the latest epoch's checkpoints stay on disk.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from listing_vision.training.amp import MixedPrecision
from listing_vision.training.data import Example
from listing_vision.training.errors import Diverged
from listing_vision.training.losses import best_image_cosine, binary_loss, contrastive_loss
from listing_vision.training.trainable import Trainable
from worker.decode import decode_image

MAX_LOGIT_SCALE = math.log(100)  # open_clip's clamp: a temperature below 0.01 only overfits
CENTRE_LR = 1e-3  # the labelled loss's match/mismatch boundary moves in cosine units
_OVERFLOW_STEPS = 20  # fp16 steps skipped in a row (overflowing gradients) that mean divergence
_DRAFT = 256


def default_loader_workers() -> int:
    """Processes that decode and transform images while the model trains."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; `epochs` is the most that will run (patience may stop sooner)."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 5e-5
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    max_grad_norm: float = 1.0
    patience: int = 2
    seed: int = 0
    half: bool = False  # store weights in fp16 (half the size; loads into fp32 fine)
    loader_workers: int = 0
    max_image_pixels: int = 40_000_000  # LV_MAX_IMAGE_PIXELS (`run.train` sets it)


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    seconds: float


@dataclass(frozen=True)
class FitResult:
    """What the loop did: every epoch, the base model's validation loss, the best epoch and
    its checkpoint, why it stopped before `epochs` (None: it did not)."""

    epochs: list[EpochResult]
    baseline_val_loss: float
    best: EpochResult
    best_dir: Path
    steps: int
    stopped_early: str | None


@dataclass(frozen=True)
class _Batch:
    indices: list[int]
    pixels: torch.Tensor  # every image of the batch's examples
    owners: torch.Tensor  # image i belongs to the batch's example owners[i]

    def pin_memory(self) -> _Batch:
        """The DataLoader's hook: page-locked pixels copy to the GPU asynchronously."""
        return replace(self, pixels=self.pixels.pin_memory())


class _Pairs(Dataset[tuple[int, list[torch.Tensor]]]):
    def __init__(
        self,
        examples: Sequence[Example],
        transform: Callable[[Image.Image], torch.Tensor],
        max_pixels: int,
    ) -> None:
        self.examples = examples
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[int, list[torch.Tensor]]:
        images = self.examples[index].images
        return index, [self.transform(self._decode(path)) for path in images]

    def _decode(self, path: Path) -> Image.Image:
        data = path.read_bytes()
        return decode_image(data, max_pixels=self.max_pixels, draft_size=_DRAFT).pixels


def _collate(items: list[tuple[int, list[torch.Tensor]]]) -> _Batch:
    owners = [position for position, (_, pixels) in enumerate(items) for _ in pixels]
    return _Batch(
        [index for index, _ in items],
        torch.stack([p for _, pixels in items for p in pixels]),
        torch.tensor(owners, dtype=torch.long),
    )


class Objective:
    """The loss of a batch (`losses.py`): contrastive, or binary on labelled pairs. For a
    cosine-scored model the binary loss learns its own boundary (`centre`, not saved: the
    threshold is calibrated afterwards) at the model's fixed temperature; a SigLIP-style model
    learns its own scale and bias, which are its scoring."""

    def __init__(self, trainable: Trainable, labelled: bool, initial_threshold: float) -> None:
        self.trainable = trainable
        self.labelled = labelled
        self.centre: torch.nn.Parameter | None = None
        if labelled and trainable.logit_bias is None:
            self.centre = torch.nn.Parameter(
                torch.tensor(initial_threshold, device=trainable.device)
            )
            trainable.logit_scale.requires_grad_(False)

    def loss(self, batch: _Batch, examples: Sequence[Example]) -> torch.Tensor | None:
        """The batch's loss; None for a contrastive batch of one pair (nothing to contrast)."""
        device = self.trainable.device
        texts = [examples[i].text for i in batch.indices]
        if not self.labelled and len(texts) < 2:
            return None
        pixels = batch.pixels.to(device, non_blocking=True)
        images, words = self.trainable.encode(pixels, texts)
        scale = self.trainable.logit_scale.exp()
        bias: torch.Tensor | None = self.trainable.logit_bias
        if not self.labelled:
            return contrastive_loss(images, words, scale, bias)
        cosines = best_image_cosine(images, words, batch.owners.to(device))
        mismatch = torch.tensor([bool(examples[i].mismatch) for i in batch.indices], device=device)
        if self.centre is not None:
            bias = -scale * self.centre
        assert bias is not None
        return binary_loss(cosines, mismatch, scale, bias)


def fit(
    trainable: Trainable,
    objective: Objective,
    train: Sequence[Example],
    val: Sequence[Example],
    config: TrainConfig,
    amp: MixedPrecision,
    checkpoints: Path,
    log: Callable[[str], None],
) -> FitResult:
    """Train, validating after every epoch; `Diverged` if the optimisation blows up."""
    torch.manual_seed(config.seed)
    train_batches = _loader(trainable.train_transform, train, config, shuffle=True)
    val_batches = _loader(trainable.eval_transform, val, config, shuffle=False)
    optimizer = _optimizer(trainable, objective, config)
    total = len(train_batches) * config.epochs
    schedule = _warmup_cosine(optimizer, total, max(1, int(total * config.warmup_fraction)))
    steps = _Steps(trainable, objective, optimizer, schedule, amp, config)
    baseline = _validation_loss(objective, val_batches, val, amp)
    log(f"epoch 0 (the base model): validation loss {baseline:.4f}")
    if not math.isfinite(baseline):
        raise Diverged(f"the base model's validation loss is {baseline}: check the model")
    results: list[EpochResult] = []
    best: EpochResult | None = None
    stopped = None
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        try:
            train_loss = steps.epoch(epoch, train_batches, train)
            val_loss = _validation_loss(objective, val_batches, val, amp)
        except Diverged as error:
            raise Diverged(f"{error}{_kept_so_far(best, checkpoints)}") from None
        if not math.isfinite(val_loss):
            raise Diverged(
                f"training diverged in epoch {epoch}: the validation loss is {val_loss}"
                f"{_kept_so_far(best, checkpoints)}"
            )
        result = EpochResult(epoch, train_loss, val_loss, time.perf_counter() - started)
        results.append(result)
        _save_checkpoint(trainable, result, checkpoints, config.half)
        improved = best is None or val_loss < best.val_loss
        if improved or best is None:
            best = result
        _prune(checkpoints, keep={best.epoch, epoch})
        log(
            f"epoch {epoch}/{config.epochs}: training loss {train_loss:.4f}, validation loss "
            f"{val_loss:.4f}{' (best)' if improved else ''}, {result.seconds:.1f}s"
        )
        if epoch - best.epoch >= config.patience and epoch < config.epochs:
            stopped = (
                f"the validation loss has not improved for {config.patience} epoch(s) "
                f"(best: epoch {best.epoch})"
            )
            log(f"stopping early: {stopped}")
            break
    assert best is not None  # epochs >= 1
    return FitResult(
        results, baseline, best, checkpoint_dir(checkpoints, best.epoch), steps.count, stopped
    )


def checkpoint_dir(checkpoints: Path, epoch: int) -> Path:
    return checkpoints / f"epoch-{epoch:03d}"


class _Steps:
    """Optimiser steps under mixed precision, with clipping and divergence checks."""

    def __init__(
        self,
        trainable: Trainable,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        amp: MixedPrecision,
        config: TrainConfig,
    ) -> None:
        self.trainable = trainable
        self.objective = objective
        self.optimizer = optimizer
        self.schedule = schedule
        self.amp = amp
        self.scaler = amp.grad_scaler()
        self.config = config
        self.parameters = [p for g in optimizer.param_groups for p in g["params"]]
        self.count = 0
        self._overflowed = 0

    def epoch(self, epoch: int, batches: DataLoader[Any], examples: Sequence[Example]) -> float:
        """One pass over the training data; the mean loss of its steps."""
        self.trainable.model.train()
        total = weight = 0.0
        for step, batch in enumerate(batches, start=1):
            with self.amp.autocast():
                loss = self.objective.loss(batch, examples)
            if loss is None:
                continue
            value = float(loss.detach())
            if not math.isfinite(value):
                raise self._diverged(epoch, step, f"the training loss is {value}")
            self._step(loss, epoch, step)
            total += value * len(batch.indices)
            weight += len(batch.indices)
        return total / weight if weight else float("nan")

    def _step(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
            if not math.isfinite(float(norm)):
                raise self._diverged(epoch, step, f"the gradient norm is {float(norm)}")
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped when the fp16 gradients overflowed
            self.scaler.update()
            self._overflowed = self._overflowed + 1 if self.scaler.get_scale() < before else 0
            if self._overflowed >= _OVERFLOW_STEPS:
                raise self._diverged(
                    epoch, step, f"fp16 gradients overflowed {_OVERFLOW_STEPS} steps in a row"
                )
        self.schedule.step()
        self.count += 1
        with torch.no_grad():
            self.trainable.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def _diverged(self, epoch: int, step: int, what: str) -> Diverged:
        lr = self.optimizer.param_groups[0]["lr"]
        return Diverged(
            f"training diverged in epoch {epoch}, step {step}: {what} (learning rate {lr:.3g} "
            f"at that step, precision {self.amp.name}); lower --lr"
        )


def _kept_so_far(best: EpochResult | None, checkpoints: Path) -> str:
    if best is None:
        return "; no epoch finished, nothing was kept"
    where = checkpoint_dir(checkpoints, best.epoch)
    return (
        f"; the best epoch before it ({best.epoch}, validation loss {best.val_loss:.4f}) "
        f"is in {where}"
    )


@torch.no_grad()
def _validation_loss(
    objective: Objective,
    batches: DataLoader[Any],
    examples: Sequence[Example],
    amp: MixedPrecision,
) -> float:
    """The mean loss over the validation data, in evaluation mode, batches in a fixed order."""
    objective.trainable.model.eval()
    total = weight = 0.0
    for batch in batches:
        with amp.autocast():
            loss = objective.loss(batch, examples)
        if loss is not None:
            total += float(loss) * len(batch.indices)
            weight += len(batch.indices)
    return total / weight if weight else float("nan")


def _loader(
    transform: Callable[[Image.Image], torch.Tensor],
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    shuffle: bool,
) -> DataLoader[Any]:
    workers = config.loader_workers
    return DataLoader(
        _Pairs(examples, transform, config.max_image_pixels),
        batch_size=config.batch_size,
        shuffle=shuffle,
        collate_fn=_collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(config.seed),
    )


def _optimizer(
    trainable: Trainable, objective: Objective, config: TrainConfig
) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases and the temperature (open_clip's practice)."""
    named = [(n, p) for n, p in trainable.model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "logit_" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "logit_" not in n)]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    if objective.centre is not None:
        groups.append({"params": [objective.centre], "weight_decay": 0.0, "lr": CENTRE_LR})
    return torch.optim.AdamW(groups, lr=config.lr)


def _warmup_cosine(
    optimizer: torch.optim.Optimizer, total: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _save_checkpoint(
    trainable: Trainable, result: EpochResult, checkpoints: Path, half: bool
) -> None:
    """The epoch's model in the form the registry loads, and its losses beside it."""
    directory = checkpoint_dir(checkpoints, result.epoch)
    if directory.exists():
        shutil.rmtree(directory)
    trainable.save(directory, half=half)
    (directory / "checkpoint.json").write_text(json.dumps(asdict(result), indent=2) + "\n")


def _prune(checkpoints: Path, keep: set[int]) -> None:
    kept = {checkpoint_dir(checkpoints, epoch) for epoch in keep}
    for directory in _epoch_dirs(checkpoints):
        if directory not in kept:
            shutil.rmtree(directory)


def _epoch_dirs(checkpoints: Path) -> Iterator[Path]:
    return (d for d in sorted(checkpoints.glob("epoch-*")) if d.is_dir())
