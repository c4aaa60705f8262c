"""The Milvus mirror's store: one collection per model, keyed like `embeddings` (by image
content), and an alias that follows the active model.

pgvector stays the source of truth (docs/milvus-mirror.md): everything here is a copy that can
be rebuilt from it, so every write is an idempotent upsert. pymilvus is imported only when a
store is opened, so processes without a mirror never load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract.settings import Settings

ACTIVE_ALIAS = "lv_active"  # always names the active model's collection
PRIMARY_FIELD = "sha256"
VECTOR_FIELD = "embedding"
_SERVER_URI = re.compile(r"https?://", re.IGNORECASE)
# Milvus bounds the length of a filter expression; 1,000 hex ids of 64 characters fit easily.
_IDS_PER_QUERY = 1000


class MirrorUnavailable(RuntimeError):
    """Milvus cannot be reached or refused a request; the mirror falls behind, nothing else."""


class MirrorMismatch(RuntimeError):
    """A model's collection exists with another dimension than the model's embeddings."""


def collection_name(model_id: str) -> str:
    """A valid collection name for any model id, readable and unique: `lv_<id>_<8 hex>`."""
    digest = hashlib.sha1(model_id.encode()).hexdigest()[:8]
    safe = "".join(c if c.isascii() and c.isalnum() else "_" for c in model_id)[:64]
    return f"lv_{safe}_{digest}"


@dataclass(frozen=True)
class Hit:
    """One nearest image from a Milvus search: its content hash and cosine similarity."""

    sha256: str
    similarity: float


class MilvusStore:
    """A connection to Milvus (a server, or milvus-lite served on 127.0.0.1 by the CLI).

    Not thread-safe by contract: a worker's mirror thread owns one; commands open their own.
    Every call is bounded by `timeout` seconds and raises `MirrorUnavailable` on any failure.
    """

    def __init__(self, uri: str, *, token: str | None = None, timeout: float = 10.0) -> None:
        if not _SERVER_URI.match(uri):
            raise MirrorUnavailable(
                f"milvus-lite at {uri} is not being served (its server did not start: see the "
                "log above); the mirror stays behind until `listing-vision mirror` catches it up"
            )
        self.uri = uri
        self.timeout = timeout
        try:
            from pymilvus import MilvusClient
        except ImportError as error:
            raise MirrorUnavailable(
                "pymilvus is not installed: pip install 'listing-vision[milvus]'"
            ) from error
        try:
            _quiet_pymilvus()
            self._client: Any = MilvusClient(uri=uri, token=token or "", timeout=timeout)
        except Exception as error:
            raise MirrorUnavailable(f"Milvus at {uri}: {_short(error)}") from error
        self._ready: set[str] = set()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a dead connection needs no goodbye
            self._client.close()

    def __enter__(self) -> MilvusStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, method)(*args, timeout=self.timeout, **kwargs)
        except Exception as error:
            raise MirrorUnavailable(f"Milvus {method} at {self.uri}: {_short(error)}") from error

    # --- collections ---------------------------------------------------------------------

    def has_collection(self, model_id: str) -> bool:
        return bool(self._call("has_collection", collection_name(model_id)))

    def ensure_collection(self, model_id: str, dim: int) -> str:
        """The model's collection, created (cosine index) and loaded if need be; a collection
        of another dimension is a `MirrorMismatch` (the model id was reused for another
        model: its pgvector rows have the new dimension, the old collection must go)."""
        name = collection_name(model_id)
        if name in self._ready:
            return name
        if self._call("has_collection", name):
            found = self.dimension(model_id)
            if found != dim:
                raise MirrorMismatch(
                    f"Milvus collection {name} of {model_id} has dimension {found}, the model "
                    f"{dim}: drop the collection and run `listing-vision mirror --model "
                    f"{model_id}` to rebuild it"
                )
            state = self._call("get_load_state", name)
            if "NotLoad" in str(state.get("state", "")):
                self._call("load_collection", name)
        else:
            self._create(name, model_id, dim)
        self._ready.add(name)
        return name

    def _create(self, name: str, model_id: str, dim: int) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(
            auto_id=False,
            enable_dynamic_field=False,
            description=f"listing-vision image embeddings of {model_id}"[:255],
        )
        schema.add_field(PRIMARY_FIELD, DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=int(dim))
        index = self._client.prepare_index_params()
        # AUTOINDEX: HNSW on a Milvus server, whatever milvus-lite offers locally; cosine, as
        # the pgvector indexes.
        index.add_index(field_name=VECTOR_FIELD, index_type="AUTOINDEX", metric_type="COSINE")
        try:
            self._call("create_collection", name, schema=schema, index_params=index)
        except MirrorUnavailable:
            # Two workers of one model may create it together: the other one's is as good.
            if not self._call("has_collection", name):
                raise

    def dimension(self, model_id: str) -> int | None:
        """The vector dimension of the model's collection (None when it has none)."""
        name = collection_name(model_id)
        if not self._call("has_collection", name):
            return None
        described = self._call("describe_collection", name)
        for field in described.get("fields", []):
            if field.get("name") == VECTOR_FIELD:
                return int(field.get("params", {}).get("dim"))
        return None

    # --- rows ----------------------------------------------------------------------------

    def upsert(self, model_id: str, vectors: Mapping[str, np.ndarray | Sequence[float]]) -> int:
        """Write `vectors` (by SHA-256) into the model's collection; repeating it changes
        nothing (upsert on the primary key). The collection must have been ensured."""
        if not vectors:
            return 0
        # float32 arrays as they are: pymilvus packs them without a list of Python floats.
        rows = [
            {PRIMARY_FIELD: sha, VECTOR_FIELD: np.asarray(vector, dtype=np.float32)}
            for sha, vector in sorted(vectors.items())
        ]
        self._call("upsert", collection_name(model_id), rows)
        return len(rows)

    def present(self, model_id: str, shas: Sequence[str]) -> set[str]:
        """Which of `shas` the model's collection holds (strongly consistent: just written
        rows count)."""
        found: set[str] = set()
        unique = sorted(set(shas))
        for start in range(0, len(unique), _IDS_PER_QUERY):
            rows = self._call(
                "query",
                collection_name(model_id),
                ids=unique[start : start + _IDS_PER_QUERY],
                output_fields=[PRIMARY_FIELD],
                consistency_level="Strong",
            )
            found.update(str(row[PRIMARY_FIELD]) for row in rows)
        return found

    def vectors(self, model_id: str, shas: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of `shas` (those present), as float32 arrays."""
        found: dict[str, np.ndarray] = {}
        unique = sorted(set(shas))
        for start in range(0, len(unique), _IDS_PER_QUERY):
            rows = self._call(
                "query",
                collection_name(model_id),
                ids=unique[start : start + _IDS_PER_QUERY],
                output_fields=[PRIMARY_FIELD, VECTOR_FIELD],
                consistency_level="Strong",
            )
            for row in rows:
                found[str(row[PRIMARY_FIELD])] = np.asarray(row[VECTOR_FIELD], dtype=np.float32)
        return found

    def count(self, model_id: str) -> int:
        """Rows in the model's collection (0 when it has none)."""
        name = collection_name(model_id)
        if not self._call("has_collection", name):
            return 0
        rows = self._call(
            "query", name, filter="", output_fields=["count(*)"], consistency_level="Strong"
        )
        return int(rows[0]["count(*)"]) if rows else 0

    def search(self, vector: Sequence[float] | np.ndarray, k: int, collection: str) -> list[Hit]:
        """The `k` nearest images (cosine) in `collection`, a collection or an alias such as
        `ACTIVE_ALIAS`."""
        query = np.asarray(vector, dtype=np.float32).tolist()
        results = self._call(
            "search",
            collection,
            data=[query],
            limit=int(k),
            output_fields=[PRIMARY_FIELD],
            anns_field=VECTOR_FIELD,
            search_params={"metric_type": "COSINE"},
            consistency_level="Strong",
        )
        hits = results[0] if results else []
        return [Hit(str(hit["entity"][PRIMARY_FIELD]), float(hit["distance"])) for hit in hits]

    # --- the alias ------------------------------------------------------------------------

    def alias_target(self, alias: str = ACTIVE_ALIAS) -> str | None:
        """The collection `alias` names, None when it does not exist."""
        listed = self._call("list_aliases")
        if alias not in (listed.get("aliases") or []):
            return None
        target = self._call("describe_alias", alias).get("collection_name")
        return str(target) if target else None

    def point_alias(self, model_id: str, alias: str = ACTIVE_ALIAS) -> bool:
        """Make `alias` name the model's collection (which must exist); True when it moved."""
        name = collection_name(model_id)
        current = self.alias_target(alias)
        if current == name:
            return False
        if current is None:
            try:
                self._call("create_alias", name, alias)
                return True
            except MirrorUnavailable:
                if self.alias_target(alias) is None:  # not created by someone else meanwhile
                    raise
        self._call("alter_alias", name, alias)
        return True


def open_store(settings: Settings) -> MilvusStore:
    """A store on `LV_MILVUS_URI` (resolved: milvus-lite's served address), which must be set."""
    if settings.milvus_uri is None:
        raise MirrorUnavailable("LV_MILVUS_URI is not set: there is no Milvus mirror")
    token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
    return MilvusStore(settings.milvus_uri, token=token, timeout=settings.milvus_timeout)


def _quiet_pymilvus() -> None:
    """pymilvus logs every failed call at ERROR with a traceback, through handlers of its own
    (our log format does not reach them): our callers log each failure once, in one line."""
    for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.decorators"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _short(error: Exception) -> str:
    """One line of a pymilvus error (they carry multi-line gRPC details)."""
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__
