"""Image embeddings in pgvector: the per-(image, model) cache and nearest-neighbour search.

The `embedding` column has no fixed dimension because models differ, so each model gets its own
partial HNSW index on a cast to its dimension (`db.embedding_index`); queries repeat the same
cast and filter, which is what lets the planner use that index (pgvector's documented pattern
for mixed dimensions).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format
from sqlalchemy import Select, Text, any_, bindparam, column, func, select, table, text
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.orm import Session

from db.embedding_index import model_literal, vector_cast
from db.records import ImageFacts
from db.schema import Embedding, Image, table_of


@dataclass(frozen=True)
class CachedImage:
    """An image this model has already embedded: its stored facts and vector (float32)."""

    facts: ImageFacts
    embedding: np.ndarray


def vector_bytes(column: Any) -> Any:
    """Select a vector in pgvector's binary form, for `parse_vector`: reading it is some 60
    times faster than parsing its text (2 µs against 100 µs for 512 dimensions)."""
    return func.vector_send(column)


def parse_vector(data: bytes) -> np.ndarray:
    """pgvector's binary form (int16 dimensions, int16 unused, big-endian float32s) as an
    array."""
    return np.frombuffer(data, dtype=">f4", offset=4).astype(np.float32)


def _cached_statement() -> Select[Any]:
    """Built once: stored facts and this model's vector for each SHA-256 among `shas`."""
    image, embedding = table_of(Image), table_of(Embedding)
    return (
        select(
            image.c.sha256,
            image.c.width,
            image.c.height,
            image.c.format,
            image.c.bytes,
            image.c.blur,
            image.c.brightness,
            vector_bytes(embedding.c.embedding),
        )
        .join_from(image, embedding, embedding.c.sha256 == image.c.sha256)
        .where(
            embedding.c.model_id == bindparam("model_id", type_=Text),
            image.c.sha256 == any_(bindparam("shas", type_=ARRAY(Text))),
        )
    )


_CACHED = _cached_statement()


def cached_images(session: Session, shas: Sequence[str], model_id: str) -> dict[str, CachedImage]:
    """Images (by SHA-256) that already have an embedding from `model_id` (one round trip:
    every job of a worker asks this)."""
    if not shas:
        return {}
    rows = session.execute(_CACHED, {"shas": sorted(set(shas)), "model_id": model_id}).all()
    return {
        sha: CachedImage(
            ImageFacts(sha, width, height, image_format, size, blur, brightness),
            parse_vector(vector),
        )
        for sha, width, height, image_format, size, blur, brightness, vector in rows
    }


class BinaryVector:
    """A vector in pgvector's binary input form, sent as a binary parameter: writing a
    1,024-dimension vector as text cost the worker some 0.3 ms (a Python `str` per float) and
    the server a parse per float; this is one `tobytes`. The parameter's type is left to the
    server (oid 0), which infers `vector` from the column it goes to."""

    __slots__ = ("data",)

    def __init__(self, values: Sequence[float] | np.ndarray) -> None:
        array = np.asarray(values, dtype=">f4")
        if array.ndim != 1:
            raise ValueError(f"a vector is one-dimensional, not {array.shape}")
        self.data = struct.pack(">HH", len(array), 0) + array.tobytes()


class _BinaryVectorDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: BinaryVector) -> bytes:
        return obj.data


psycopg.adapters.register_dumper(BinaryVector, _BinaryVectorDumper)

# The embeddings table with untyped columns: SQLAlchemy hands a `BinaryVector` to psycopg as it
# is (the mapped `Vector` column would turn it into text first).
_EMBEDDINGS_FOR_WRITE = table(
    table_of(Embedding).name, column("sha256"), column("model_id"), column("embedding")
)
_INSERT_EMBEDDINGS = insert(_EMBEDDINGS_FOR_WRITE).on_conflict_do_nothing()


def insert_embeddings(
    session: Session, model_id: str, embeddings: Mapping[str, Sequence[float] | np.ndarray]
) -> None:
    """Store new image embeddings (in SHA-256 order, so concurrent writers cannot deadlock)."""
    if not embeddings:
        return
    rows = [
        {"sha256": sha, "model_id": model_id, "embedding": BinaryVector(embeddings[sha])}
        for sha in sorted(embeddings)
    ]
    session.execute(_INSERT_EMBEDDINGS, rows)


@dataclass(frozen=True)
class Neighbour:
    """A listing near the one asked about: cosine distance and the image that was nearest."""

    listing_id: str
    distance: float
    sha256: str


def nearest_listings(
    session: Session, listing_id: str, model_id: str, dim: int, k: int
) -> list[Neighbour]:
    """The `k` other listings whose images are closest (cosine) to any image of `listing_id`."""
    fanout = k * 4 + 10
    # HNSW returns at most ef_search rows per scan (default 40): widen it to what we ask for.
    session.execute(text(f"SET LOCAL hnsw.ef_search = {max(40, min(fanout, 1000))}"))
    query = text(nearest_sql(model_id, dim))
    rows = session.execute(query, {"listing_id": listing_id, "fanout": fanout, "k": k}).all()
    return [Neighbour(row.listing_id, float(row.distance), row.sha256) for row in rows]


def nearest_sql(model_id: str, dim: int) -> str:
    """The neighbour query; the model filter is a literal so the partial index's predicate
    matches it, and the cast repeats the index expression."""
    literal = model_literal(model_id)
    cast = vector_cast(dim)
    return f"""
        WITH mine AS (
            SELECT DISTINCT e.embedding::{cast} AS embedding
            FROM listing_images li
            JOIN embeddings e ON e.sha256 = li.sha256 AND e.model_id = {literal}
            WHERE li.listing_id = :listing_id
        ),
        near AS (
            SELECT n.sha256, n.distance
            FROM mine
            CROSS JOIN LATERAL (
                SELECT e.sha256, e.embedding::{cast} <=> mine.embedding AS distance
                FROM embeddings e
                WHERE e.model_id = {literal}
                ORDER BY e.embedding::{cast} <=> mine.embedding
                LIMIT :fanout
            ) n
        )
        SELECT li.listing_id, min(near.distance) AS distance,
               (array_agg(near.sha256 ORDER BY near.distance))[1] AS sha256
        FROM near
        JOIN listing_images li ON li.sha256 = near.sha256
        WHERE li.listing_id <> :listing_id
        GROUP BY li.listing_id
        ORDER BY distance, li.listing_id
        LIMIT :k
        """


def nearest_to_vector(
    session: Session, vector: Sequence[float], model_id: str, dim: int, k: int
) -> list[Neighbour]:
    """The `k` listings whose images are closest (cosine) to a query vector of `model_id`'s
    space (a text embedding, or a new image's): `similar --text`."""
    if len(vector) != dim:
        raise ValueError(f"a query of {len(vector)} dimensions for {model_id}'s {dim}")
    fanout = k * 4 + 10
    session.execute(text(f"SET LOCAL hnsw.ef_search = {max(40, min(fanout, 1000))}"))
    query = "[" + ",".join(repr(float(x)) for x in vector) + "]"
    rows = session.execute(
        text(nearest_vector_sql(model_id, dim)), {"query": query, "fanout": fanout, "k": k}
    ).all()
    return [Neighbour(row.listing_id, float(row.distance), row.sha256) for row in rows]


def nearest_vector_sql(model_id: str, dim: int) -> str:
    """The query-vector search: the same index expression and literal model filter as
    `nearest_sql`."""
    literal = model_literal(model_id)
    cast = vector_cast(dim)
    return f"""
        WITH near AS (
            SELECT e.sha256, e.embedding::{cast} <=> CAST(:query AS {cast}) AS distance
            FROM embeddings e
            WHERE e.model_id = {literal}
            ORDER BY e.embedding::{cast} <=> CAST(:query AS {cast})
            LIMIT :fanout
        )
        SELECT li.listing_id, min(near.distance) AS distance,
               (array_agg(near.sha256 ORDER BY near.distance))[1] AS sha256
        FROM near
        JOIN listing_images li ON li.sha256 = near.sha256
        GROUP BY li.listing_id
        ORDER BY distance, li.listing_id
        LIMIT :k
        """


def listing_titles(session: Session, listing_ids: Sequence[str]) -> dict[str, str]:
    """Titles of these listings, for display."""
    rows = session.execute(
        text("SELECT listing_id, title FROM listings WHERE listing_id = ANY(:ids)"),
        {"ids": list(listing_ids)},
    ).all()
    return {listing_id: title for listing_id, title in rows}


def display_rows(session: Session, neighbours: Sequence[Neighbour]) -> list[dict[str, object]]:
    """Neighbours with their titles and cosine similarity, for display."""
    titles = listing_titles(session, [n.listing_id for n in neighbours])
    return [
        {
            "listing_id": n.listing_id,
            "distance": n.distance,
            "similarity": 1.0 - n.distance,
            "title": titles.get(n.listing_id),
            "sha256": n.sha256,
        }
        for n in neighbours
    ]
