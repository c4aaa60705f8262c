"""Embeddings are written to pgvector in its binary form: what is read back is what was sent."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import text

from db.embeddings import BinaryVector, cached_images, insert_embeddings
from db.images import insert_image_facts
from db.records import ImageFacts, ListingImageRecord
from tests.integration.conftest import Stack, query, sessions_with_model


def _facts(sha: str) -> ListingImageRecord:
    return ListingImageRecord(0, "file:///x.jpg", ImageFacts(sha, 8, 8, "JPEG", 100, 1.0, 0.5))


def test_vectors_round_trip_exactly_as_float32_whatever_their_form(stack: Stack) -> None:
    sessions = sessions_with_model(stack, "binary-vectors")
    rng = np.random.default_rng(3)
    sent = {
        "bv-list": rng.standard_normal(1024).astype(np.float32).tolist(),  # as analysis sends
        "bv-array": rng.standard_normal(512).astype(np.float32),
        "bv-tiny": [0.5, -0.25, 1e-30],
    }
    with sessions.begin() as session:
        insert_image_facts(session, [_facts(sha) for sha in sent])
        insert_embeddings(session, "binary-vectors", sent)
        insert_embeddings(session, "binary-vectors", {"bv-tiny": [9.0, 9.0, 9.0]})  # kept: first

    with sessions() as session:
        got = cached_images(session, list(sent), "binary-vectors")
    for sha, vector in sent.items():
        assert np.array_equal(got[sha].embedding, np.asarray(vector, dtype=np.float32))
    rows = query(
        stack, "SELECT vector_dims(embedding) AS d FROM embeddings WHERE sha256 = 'bv-list'"
    )
    assert rows == [{"d": 1024}]
    text_form = query(stack, "SELECT embedding::text AS t FROM embeddings WHERE sha256 = 'bv-tiny'")
    assert text_form == [{"t": "[0.5,-0.25,1e-30]"}]


def test_a_vector_that_is_not_one_dimensional_is_refused_before_the_database() -> None:
    with pytest.raises(ValueError, match="one-dimensional"):
        BinaryVector(np.zeros((2, 3)))


def test_a_binary_vector_outside_a_vector_column_is_an_error(stack: Stack) -> None:
    """The server infers the parameter's type from where it goes: into a text column, the
    binary form is refused, not stored as garbage."""
    sessions = sessions_with_model(stack, "binary-vectors")
    with sessions() as session, pytest.raises(Exception, match=r"(?i)binary|invalid|format"):
        session.execute(text("SELECT CAST(:v AS text)"), {"v": BinaryVector([1.0, 2.0])})
