"""pgvector to Milvus: what the mirror copies, how it catches up, where its alias points, and
searches through it.

The mirror holds exactly what `embeddings` holds (vectors are read back from PostgreSQL, never
taken from a worker's memory), so a copy made late, twice or by several processes at once is
the same copy. Milvus never decides anything: the active model is PostgreSQL's `active_model`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Text, any_, bindparam, func, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, sessionmaker

from db import registered_models
from db.embeddings import Neighbour, parse_vector, vector_bytes
from db.milvus import ACTIVE_ALIAS, MilvusStore
from db.schema import Embedding, table_of

log = logging.getLogger(__name__)
PAGE = 1000  # embeddings per catch-up step: one keyset page, one presence query, one upsert

_VECTORS = (
    select(table_of(Embedding).c.sha256, vector_bytes(table_of(Embedding).c.embedding))
    .where(
        table_of(Embedding).c.model_id == bindparam("model_id", type_=Text),
        table_of(Embedding).c.sha256 == any_(bindparam("shas", type_=ARRAY(Text))),
    )
    .order_by(table_of(Embedding).c.sha256)
)


def stored_vectors(session: Session, model_id: str, shas: Sequence[str]) -> dict[str, np.ndarray]:
    """The model's vectors of `shas` as pgvector holds them (those it holds)."""
    if not shas:
        return {}
    rows = session.execute(_VECTORS, {"model_id": model_id, "shas": sorted(set(shas))}).all()
    return {sha: parse_vector(data) for sha, data in rows}


def embedding_page(session: Session, model_id: str, after: str, limit: int) -> list[str]:
    """The next `limit` SHA-256s the model has embedded, after `after` (keyset, in order)."""
    return list(
        session.scalars(
            text(
                "SELECT sha256 FROM embeddings WHERE model_id = :model_id AND sha256 > :after "
                "ORDER BY sha256 LIMIT :limit"
            ),
            {"model_id": model_id, "after": after, "limit": limit},
        )
    )


def model_dimension(session: Session, model_id: str) -> int | None:
    """The model's embedding size: what its worker recorded, else what it stored."""
    dim = registered_models.embed_dim(session, model_id)
    if dim is not None:
        return dim
    stored = session.scalar(
        select(func.vector_dims(table_of(Embedding).c.embedding))
        .where(table_of(Embedding).c.model_id == model_id)
        .limit(1)
    )
    return int(stored) if stored is not None else None


def embedded_models(session: Session) -> list[str]:
    """The models that have stored embeddings (what `mirror` without --model catches up)."""
    return list(
        session.scalars(
            text(
                "SELECT model_id FROM models m WHERE EXISTS "
                "(SELECT 1 FROM embeddings e WHERE e.model_id = m.model_id) ORDER BY model_id"
            )
        )
    )


def copy_to_mirror(
    sessions: sessionmaker[Session], store: MilvusStore, model_id: str, shas: Sequence[str]
) -> int:
    """Upsert the model's stored vectors of `shas` (read back from pgvector); returns how many.
    SHA-256s pgvector does not hold (a write that was fenced out) are skipped."""
    written = 0
    unique = sorted(set(shas))
    for start in range(0, len(unique), PAGE):
        with sessions() as session:
            vectors = stored_vectors(session, model_id, unique[start : start + PAGE])
        written += store.upsert(model_id, vectors)
    return written


def sync_alias(session: Session, store: MilvusStore, alias: str = ACTIVE_ALIAS) -> str | None:
    """Point `alias` at the active model's collection (created if need be); returns that
    model, or None when there is nothing to point at yet (no active model recorded, or no
    worker has told its dimension)."""
    row = registered_models.active_model_row(session)
    if row is None:
        return None
    dim = model_dimension(session, row.model_id)
    if dim is None:
        log.info("Milvus alias %s left as it is: %s has no embeddings yet", alias, row.model_id)
        return None
    store.ensure_collection(row.model_id, dim)
    if store.point_alias(row.model_id, alias):
        log.warning("Milvus alias %s now names %s's collection", alias, row.model_id)
    return row.model_id


@dataclass
class CatchUp:
    """One model's catch-up: embeddings in pgvector, already in Milvus, written now."""

    model_id: str
    stored: int = 0
    present: int = 0
    written: int = 0


def catch_up(
    sessions: sessionmaker[Session],
    store: MilvusStore,
    model_id: str,
    *,
    rewrite: bool = False,
    page: int = PAGE,
    progress: Callable[[CatchUp], None] | None = None,
) -> CatchUp:
    """Upsert what the model's collection lacks, a keyset page of pgvector at a time (memory
    stays flat); `rewrite` upserts every vector again. Idempotent: running it twice, or while
    workers mirror, writes the same rows."""
    report = CatchUp(model_id)
    with sessions() as session:
        dim = model_dimension(session, model_id)
    if dim is None:
        return report
    store.ensure_collection(model_id, dim)
    after = ""
    while True:
        with sessions() as session:
            shas = embedding_page(session, model_id, after, page)
        if not shas:
            break
        have = set() if rewrite else store.present(model_id, shas)
        missing = [sha for sha in shas if sha not in have]
        report.stored += len(shas)
        report.present += len(have)
        report.written += copy_to_mirror(sessions, store, model_id, missing)
        after = shas[-1]
        if progress is not None:
            progress(report)
    return report


def catch_up_all(
    sessions: sessionmaker[Session],
    store: MilvusStore,
    models: Sequence[str] | None = None,
    *,
    rewrite: bool = False,
) -> tuple[list[CatchUp], str | None]:
    """`catch_up` of `models` (default: every model with embeddings), then the alias synced;
    returns the reports and the model the alias names. What beat runs nightly."""
    if models is None:
        with sessions() as session:
            models = embedded_models(session)
    reports = [catch_up(sessions, store, model_id, rewrite=rewrite) for model_id in models]
    with sessions() as session:
        return reports, sync_alias(session, store)


def listing_vectors(session: Session, listing_id: str, model_id: str) -> list[np.ndarray]:
    """The model's stored vectors of a listing's images (what to search with for it)."""
    rows = session.scalars(
        text(
            "SELECT vector_send(e.embedding) FROM listing_images li "
            "JOIN embeddings e ON e.sha256 = li.sha256 AND e.model_id = :model_id "
            "WHERE li.listing_id = :listing_id ORDER BY li.position"
        ),
        {"listing_id": listing_id, "model_id": model_id},
    )
    return [parse_vector(data) for data in rows]


def nearest_listings(
    session: Session,
    store: MilvusStore,
    vector: Sequence[float] | np.ndarray,
    k: int,
    *,
    collection: str = ACTIVE_ALIAS,
    leave_out: str | None = None,
) -> list[Neighbour]:
    """The `k` listings whose images are nearest (cosine) to `vector`, searched in Milvus
    (through the active model's alias by default); Milvus knows images, so listings come from
    `listing_images` in PostgreSQL. `leave_out` is a listing not to return (the one asked about)."""
    hits = store.search(vector, k * 4 + 10, collection)
    if not hits:
        return []
    similarity = {hit.sha256: hit.similarity for hit in hits}
    rows = session.execute(
        text(
            "SELECT listing_id, sha256 FROM listing_images "
            "WHERE sha256 = ANY(:shas) AND listing_id <> :leave_out"
        ),
        {"shas": list(similarity), "leave_out": leave_out or ""},
    ).all()
    best: dict[str, tuple[float, str]] = {}
    for listing_id, sha in rows:
        distance = 1.0 - similarity[sha]
        if listing_id not in best or (distance, sha) < best[listing_id]:
            best[listing_id] = (distance, sha)
    ranked = sorted(best.items(), key=lambda item: (item[1][0], item[0]))[:k]
    return [Neighbour(listing_id, distance, sha) for listing_id, (distance, sha) in ranked]
