"""`train`: fine-tune a registry model on the user's pairs, keep the best epoch by validation
loss, calibrate its threshold on the validation data and print the registry entry to add.

Exit 2 for unusable input (naming the file and line), 1 when training diverged, else 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from contract.registry import get_spec, load_registry
from listing_vision.command_context import app, command_settings, console, errors

if TYPE_CHECKING:  # torch is imported only when a command trains
    from listing_vision.training import TrainReport
    from listing_vision.training.validation import Separation


@app.command()
def train(
    pairs: Annotated[
        Path,
        typer.Option(
            help="training pairs: a CSV with columns image,text[,label] (paths relative to it), "
            "or labelled listings (JSON lines: events plus label)"
        ),
    ],
    out: Annotated[Path, typer.Option(help="new folder to write the trained model to")],
    model: Annotated[str, typer.Option(help="registry id of the model to start from")] = (
        "clip-vit-b32"
    ),
    val: Annotated[Path | None, typer.Option(help="validation pairs, same kind as --pairs")] = None,
    val_split: Annotated[
        float | None,
        typer.Option(help="share of --pairs held out for validation, whole images at a time"),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="at most this many")] = 5,
    batch_size: Annotated[int, typer.Option(min=2)] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="peak learning rate (warm-up, cosine)")] = 5e-5,
    weight_decay: Annotated[float, typer.Option(min=0.0)] = 0.1,
    patience: Annotated[
        int, typer.Option(min=1, help="stop after this many epochs without a better val loss")
    ] = 2,
    max_grad_norm: Annotated[float, typer.Option(min=0.0, help="gradient clipping")] = 1.0,
    precision: Annotated[
        str, typer.Option(help="auto (bf16/fp16 autocast on GPU, fp32 on CPU), fp32, bf16, fp16")
    ] = "auto",
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:N (default: a GPU if any)")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=0, help="image loading processes (default: cores-1, <= 8)")
    ] = None,
    seed: int = 0,
    half: Annotated[bool, typer.Option(help="store the weights in fp16")] = False,
    model_id: Annotated[
        str | None, typer.Option("--id", help="registry id of the new entry (MODEL-finetuned)")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace a model an earlier train wrote to --out")
    ] = False,
) -> None:
    """Fine-tune an open_clip or transformers CLIP/SigLIP model on image/text pairs (contrastive,
    or labelled match/mismatch); keeps the best epoch, calibrates its threshold, prints the
    registry entry to add."""
    from listing_vision.training import Diverged, TrainConfig, TrainingError, TrainRequest
    from listing_vision.training import train as run_training
    from listing_vision.training.loop import default_loader_workers

    if val is not None and val_split is not None:
        raise typer.BadParameter("give --val FILE or --val-split F, not both")
    settings = command_settings()
    spec = get_spec(load_registry(settings.models_file), model)
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        patience=patience,
        seed=seed,
        half=half,
        loader_workers=default_loader_workers() if workers is None else workers,
    )
    request = TrainRequest(
        spec,
        pairs,
        out,
        val=val,
        val_split=0.1 if val_split is None else val_split,
        model_id=model_id,
        device=device,
        precision=precision,
        overwrite=overwrite,
        config=config,
    )
    try:
        report = run_training(settings, request, log=_say)
    except TrainingError as error:
        errors.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except Diverged as error:
        errors.print(f"training stopped: {error}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    _summary(report)


def _say(line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _summary(report: TrainReport) -> None:
    fit = report.fit
    ran = len(fit.epochs)
    _say(
        f"kept epoch {fit.best.epoch} of {ran} (validation loss {fit.best.val_loss:.4f}; the "
        f"base model's {fit.baseline_val_loss:.4f}), {fit.steps} steps"
    )
    if fit.best.val_loss >= fit.baseline_val_loss:
        _say("warning: no epoch improved on the base model's validation loss")
    after = report.after
    _say(
        f"validation, {after.scored} pairs ({after.mismatches} mismatches) scored as a worker "
        "scores them (mismatch detection at the best-F1 threshold):"
    )

    _row("base", report.before)
    _row("trained", after)
    if report.synthetic_negatives:
        _say(
            "  (the mismatches pair each image with another pair's text: real mismatches are "
            "harder; calibrate on labelled listings before relying on this threshold)"
        )
    _say(f"\nmodel written to {report.out_dir}; add to LV_MODELS_FILE:\n\n{report.entry}")


def _row(label: str, found: Separation) -> None:
    auc = "-" if found.roc_auc is None else f"{found.roc_auc:.3f}"
    best = found.best
    _say(
        f"  {label:<8} ROC AUC {auc}  F1 {best.f1:.3f} at threshold {found.threshold:.4f} "
        f"(precision {best.precision:.2f}, recall {best.recall:.2f})"
    )
