"""`similar`: the listings nearest to a stored listing or to a text (a CLIP-style model's text
tower, loaded here), by one model's HNSW index, or by several fused (reciprocal rank fusion)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy.orm import Session

from contract.registry import Registry, get_spec, load_registry
from contract.settings import SettingsError
from db.embeddings import (
    Neighbour,
    display_rows,
    listing_titles,
    nearest_listings,
    nearest_to_vector,
)
from db.registered_models import active_model_id, embed_dim
from listing_vision.command_context import (
    OutputFormat,
    app,
    command_settings,
    console,
    read_database,
)
from listing_vision.output import print_neighbours, print_results_jsonl
from listing_vision.toolkit.fusion import reciprocal_rank_fusion

FUSION_DEPTH = 50  # each model's ranking fused: at least this deep (or 3 k)


@app.command()
def similar(
    listing_id: Annotated[
        str | None, typer.Argument(help="the listing to find neighbours of")
    ] = None,
    text: Annotated[
        str | None, typer.Option(help="find listings whose images show this (text tower)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="model id (default: the active model)")] = None,
    models: Annotated[
        str | None, typer.Option(help="several model ids, comma-separated: rankings fused")
    ] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=1000, help="how many listings")] = 10,
    format: Annotated[OutputFormat, typer.Option(help="table or jsonl")] = OutputFormat.table,
) -> None:
    """The K listings whose images are nearest (cosine, pgvector HNSW) to a listing's (itself
    left out) or to a text; with --models A,B the models' rankings fused (reciprocal rank)."""
    if (listing_id is None) == (text is None):
        raise typer.BadParameter("give a LISTING_ID or --text, not both")
    if model is not None and models is not None:
        raise typer.BadParameter("give --model or --models, not both")
    settings = command_settings()
    registry = load_registry(settings.models_file)
    with read_database(settings) as (engine, session):
        ids = _model_ids(models) if models else [model or active_model_id(engine, settings.model)]
        depth = k if len(ids) == 1 else max(FUSION_DEPTH, 3 * k)
        found = {
            model_id: _nearest(session, registry, model_id, listing_id, text, depth)
            for model_id in ids
        }
        if len(ids) == 1:
            print_neighbours(console, display_rows(session, found[ids[0]]), format.value)
            return
        rows = _fused_rows(session, found, k)
    _print_fused(rows, ids, format)


def _model_ids(models: str) -> list[str]:
    ids = list(dict.fromkeys(m.strip() for m in models.split(",") if m.strip()))
    if len(ids) < 2:
        raise typer.BadParameter("--models fuses two or more models: --models A,B")
    return ids


def _nearest(
    session: Session,
    registry: Registry,
    model_id: str,
    listing_id: str | None,
    text: str | None,
    k: int,
) -> list[Neighbour]:
    dim = embed_dim(session, model_id)
    if dim is None:
        raise SettingsError(f"model {model_id} has no embeddings yet (no worker ran it)")
    if text is None:
        assert listing_id is not None
        return nearest_listings(session, listing_id, model_id, dim, k)
    vector = _text_vector(registry, model_id, text)
    if len(vector) != dim:
        raise SettingsError(
            f"{model_id} now embeds in {len(vector)} dimensions, its stored embeddings have "
            f"{dim}: reindex it first"
        )
    return nearest_to_vector(session, vector, model_id, dim, k)


def _text_vector(registry: Registry, model_id: str, text: str) -> list[float]:
    """The text's embedding by the model's text tower, loaded in this process (the text as
    written, truncated to the model's context, as titles are)."""
    from worker.backends import create_backend  # torch: only for a text query

    backend = create_backend(get_spec(registry, model_id))
    if not backend.load().has_text:
        raise SettingsError(f"{model_id} has no text tower: search it by listing, not by text")
    vector: list[float] = backend.embed_texts([text])[0].tolist()
    return vector


def _fused_rows(
    session: Session, found: dict[str, list[Neighbour]], k: int
) -> list[dict[str, Any]]:
    fused = reciprocal_rank_fusion({m: [n.listing_id for n in ns] for m, ns in found.items()})[:k]
    titles = listing_titles(session, [f.item for f in fused])
    similarity = {(m, n.listing_id): 1.0 - n.distance for m, ns in found.items() for n in ns}
    return [
        {
            "listing_id": f.item,
            "rrf_score": f.score,
            "ranks": {m: f.ranks.get(m) for m in found},
            "similarities": {m: similarity.get((m, f.item)) for m in found},
            "title": titles.get(f.item),
        }
        for f in fused
    ]


def _print_fused(rows: list[dict[str, Any]], ids: list[str], format: OutputFormat) -> None:
    if format is OutputFormat.jsonl:
        print_results_jsonl(rows)
        return
    table = Table(caption="rank per model: - when not among its nearest")
    for column in ("listing", "fused (RRF)", *(f"{m} rank" for m in ids), "title"):
        table.add_column(column, overflow="fold")
    for row in rows:
        ranks = [str(row["ranks"][m]) if row["ranks"][m] else "-" for m in ids]
        table.add_row(row["listing_id"], f"{row['rrf_score']:.4f}", *ranks, row["title"] or "")
    console.print(table)
