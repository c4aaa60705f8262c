"""`listing-vision workers`: each live worker's model, device and batching figures, from the
workers themselves (Celery's `lv_stats` remote command), for people and scripts."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from contract.broker import STATS_COMMAND, make_celery
from listing_vision.command_context import app, command_settings, console
from listing_vision.servers import connected


@app.command()
def workers(
    json_output: Annotated[bool, typer.Option("--json", help="one JSON object per worker")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the workers' replies")] = 5.0,
) -> None:
    """Live workers and how they batch: model calls, items per call, failed-batch splits
    (exit 1 when no worker answers)."""
    settings = command_settings()
    with connected(settings) as resolved:
        celery = make_celery(resolved)
        replies = celery.control.broadcast(STATS_COMMAND, reply=True, timeout=timeout)
    stats = {name: figures for reply in replies or [] for name, figures in reply.items()}
    if json_output:
        console.print_json(json.dumps({n: batching_figures(s) for n, s in sorted(stats.items())}))
    elif stats:
        for name, figures in sorted(stats.items()):
            console.print(_line(name, batching_figures(figures)), markup=False, highlight=False)
    else:
        console.print("no worker answered", markup=False)
    raise typer.Exit(0 if stats else 1)


def batching_figures(stats: dict[str, Any]) -> dict[str, Any]:
    """A worker's `lv_stats` with the figures an operator reads: mean items per model call."""
    batches, calls = stats.get("batches", {}), stats.get("model_calls", {})
    image_calls, text_calls = calls.get("image_calls", 0), calls.get("text_calls", 0)
    return {
        "model": stats.get("model"),
        "device": stats.get("device"),
        "batches": batches.get("calls", 0),
        "jobs_batched": batches.get("items", 0),
        "batch_splits": batches.get("splits", 0),
        "image_calls": image_calls,
        "images": calls.get("images", 0),
        "images_per_call": round(calls.get("images", 0) / image_calls, 1) if image_calls else None,
        "text_calls": text_calls,
        "texts": calls.get("texts", 0),
        "texts_per_call": round(calls.get("texts", 0) / text_calls, 1) if text_calls else None,
    }


def _line(name: str, f: dict[str, Any]) -> str:
    per_call = f["images_per_call"] if f["images_per_call"] is not None else "-"
    return (
        f"{name}  model {f['model']} on {f['device']}: {f['batches']} batches of "
        f"{f['jobs_batched']} jobs ({f['batch_splits']} split), {f['image_calls']} image calls "
        f"for {f['images']} images ({per_call} per call), {f['text_calls']} text calls for "
        f"{f['texts']} texts"
    )
