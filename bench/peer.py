"""The peer: a plain per-listing loop in the shape of the services listing-vision replaces.

For each listing, one after the other: decode the JPEG with PIL, the model's own preprocessing,
the image and the title encoded at batch 1, their cosine, and one row INSERTed into its own
table (`peer_results`) and committed. No queue, no batching, no cache: what the pipeline's
listings/s is compared with, same model, same files, same database.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
from PIL import Image

from worker.backends.base import ModelBackend

PEER_TABLE = """
CREATE TABLE IF NOT EXISTS peer_results (
    listing_id text NOT NULL,
    model_id text NOT NULL,
    similarity real NOT NULL,
    embedding real[] NOT NULL,
    analyzed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (listing_id, model_id)
)
"""
INSERT = """
INSERT INTO peer_results (listing_id, model_id, similarity, embedding)
VALUES (%s, %s, %s, %s)
ON CONFLICT (listing_id, model_id) DO UPDATE
SET similarity = EXCLUDED.similarity, embedding = EXCLUDED.embedding, analyzed_at = now()
"""


@dataclass(frozen=True)
class PeerListing:
    """What the peer needs of a listing: its id, title and image file."""

    listing_id: str
    title: str
    image: Path


def analyze_one(
    backend: ModelBackend, connection: psycopg.Connection, model_id: str, listing: PeerListing
) -> float:
    """One listing end to end, committed; its image-title cosine."""
    with Image.open(listing.image) as opened:
        image = opened.convert("RGB")
    pixels = backend.preprocess(image).unsqueeze(0)
    image_embedding = backend.embed_images(pixels)[0]
    text_embedding = backend.embed_texts([listing.title])[0]
    similarity = float(image_embedding @ text_embedding)  # both unit length: the cosine
    connection.execute(INSERT, (listing.listing_id, model_id, similarity, image_embedding.tolist()))
    connection.commit()
    return similarity


def run_peer(
    database_url: str, backend: ModelBackend, model_id: str, listings: Sequence[PeerListing]
) -> float:
    """Listings/s of the loop over `listings` (the backend loaded and warmed first)."""
    backend.load()
    with psycopg.connect(database_url) as connection:
        connection.execute(PEER_TABLE)
        connection.commit()
        analyze_one(backend, connection, model_id, listings[0])  # warm-up, not timed
        start = time.perf_counter()
        for listing in listings:
            analyze_one(backend, connection, model_id, listing)
        return len(listings) / (time.perf_counter() - start)
