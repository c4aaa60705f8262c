"""`similar`: the listings nearest to a stored listing, a new image or a text (the model loaded
here: `toolkit.query`), by one model's HNSW index, or by several fused (reciprocal rank
fusion)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy.orm import Session

from contract.errors import TransientError
from contract.registry import Registry, get_spec, load_registry
from contract.settings import Settings, SettingsError
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
    errors,
    read_database,
)
from listing_vision.output import print_neighbours, print_results_jsonl
from listing_vision.toolkit.fusion import reciprocal_rank_fusion
from listing_vision.toolkit.query import QueryError, image_vector, text_vector

FUSION_DEPTH = 50  # each model's ranking fused: at least this deep (or 3 k)


@app.command()
def similar(
    listing_id: Annotated[
        str | None, typer.Argument(help="the listing to find neighbours of")
    ] = None,
    image: Annotated[
        str | None, typer.Option(help="a new image: a path, or a URL (fetched as listings' are)")
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
    left out), a new image or a text; with --models A,B the models' rankings fused."""
    if sum(x is not None for x in (listing_id, image, text)) != 1:
        raise typer.BadParameter("give one of LISTING_ID, --image or --text")
    if model is not None and models is not None:
        raise typer.BadParameter("give --model or --models, not both")
    settings = command_settings()
    registry = load_registry(settings.models_file)
    query = Query(listing_id, image, text)
    try:
        with read_database(settings) as (engine, session):
            ids = (
                _model_ids(models) if models else [model or active_model_id(engine, settings.model)]
            )
            depth = k if len(ids) == 1 else max(FUSION_DEPTH, 3 * k)
            dims = {model_id: _dim(session, model_id) for model_id in ids}
            session.rollback()  # no transaction held while a model loads (idle limit)
            vectors = {
                model_id: _query_vector(settings, registry, model_id, query, dim)
                for model_id, dim in dims.items()
                if query.listing_id is None
            }
            found = {
                model_id: _nearest(session, model_id, dim, query, vectors.get(model_id), depth)
                for model_id, dim in dims.items()
            }
            if len(ids) == 1:
                print_neighbours(console, display_rows(session, found[ids[0]]), format.value)
                return
            rows = _fused_rows(session, found, k)
    except QueryError as error:
        errors.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(2) from None
    except TransientError as error:
        errors.print(f"[red]error:[/red] {error} (try again)", highlight=False)
        raise typer.Exit(1) from None
    _print_fused(rows, ids, format)


@dataclass(frozen=True)
class Query:
    """What to find neighbours of: one of a stored listing, a new image, a text."""

    listing_id: str | None
    image: str | None
    text: str | None


def _model_ids(models: str) -> list[str]:
    ids = list(dict.fromkeys(m.strip() for m in models.split(",") if m.strip()))
    if len(ids) < 2:
        raise typer.BadParameter("--models fuses two or more models: --models A,B")
    return ids


def _dim(session: Session, model_id: str) -> int:
    dim = embed_dim(session, model_id)
    if dim is None:
        raise SettingsError(f"model {model_id} has no embeddings yet (no worker ran it)")
    return dim


def _query_vector(
    settings: Settings, registry: Registry, model_id: str, query: Query, dim: int
) -> list[float]:
    """The new image's or the text's embedding by the model, loaded in this process."""
    spec = get_spec(registry, model_id)
    if query.image is not None:
        vector = image_vector(settings, spec, query.image)
    else:
        assert query.text is not None
        vector = text_vector(spec, query.text)
    if len(vector) != dim:
        raise SettingsError(
            f"{model_id} now embeds in {len(vector)} dimensions, its stored embeddings have "
            f"{dim}: reindex it first"
        )
    return vector


def _nearest(
    session: Session,
    model_id: str,
    dim: int,
    query: Query,
    vector: list[float] | None,
    k: int,
) -> list[Neighbour]:
    if query.listing_id is not None:
        return nearest_listings(session, query.listing_id, model_id, dim, k)
    assert vector is not None
    return nearest_to_vector(session, vector, model_id, dim, k)


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
