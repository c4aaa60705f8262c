"""`column = ANY(:array)` instead of `IN (:a, :b, ...)`: one bound parameter whatever the list's
length, so the statement text stays the same (psycopg caches and prepares it) and no list runs
into PostgreSQL's limit of 65,535 parameters."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import Text, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.sql.elements import CollectionAggregate


def any_ids(ids: Sequence[str]) -> CollectionAggregate[bool]:
    """`ANY` of text ids (listing ids, SHA-256s)."""
    return any_(bindparam(None, list(ids), type_=ARRAY(Text)))


def any_uuids(ids: Sequence[uuid.UUID]) -> CollectionAggregate[bool]:
    """`ANY` of UUIDs (job ids, chunk ids)."""
    return any_(bindparam(None, list(ids), type_=ARRAY(UUID(as_uuid=True))))
