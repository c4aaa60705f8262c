"""`LV_MILVUS_URI` and the mirror's naming: what a user types, what it resolves to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from contract.settings import SettingsError, load_settings
from db.milvus import MilvusStore, MirrorUnavailable, collection_name


def test_the_mirror_is_off_by_default() -> None:
    settings = load_settings()
    assert settings.milvus_uri is None and settings.milvus_lite_path is None


@pytest.mark.parametrize("uri", ["http://milvus:19530", "https://milvus.example.com", "HTTP://m:1"])
def test_a_server_uri_is_used_as_given(uri: str) -> None:
    settings = load_settings(milvus_uri=uri)
    assert settings.milvus_uri == uri and settings.milvus_lite_path is None


def test_a_path_is_milvus_lite_resolved_and_user_expanded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LV_MILVUS_URI", "~/lv/mirror.db")
    assert load_settings().milvus_lite_path == tmp_path / "lv" / "mirror.db"
    monkeypatch.chdir(tmp_path)
    assert load_settings(milvus_uri="rel.db").milvus_lite_path == tmp_path / "rel.db"


@pytest.mark.parametrize("uri", ["grpc://milvus:19530", "tcp://m:1", "   "])
def test_another_scheme_or_a_blank_is_refused_by_name(uri: str) -> None:
    with pytest.raises(SettingsError, match="LV_MILVUS_URI"):
        load_settings(milvus_uri=uri)


def test_a_resolved_uri_replaces_only_the_uri() -> None:
    settings = load_settings(milvus_uri="/data/mirror.db", model="lv-toy")
    resolved = settings.with_milvus_uri("http://127.0.0.1:4242")
    assert resolved.milvus_uri == "http://127.0.0.1:4242" and resolved.model == "lv-toy"
    assert resolved.milvus_lite_path is None


def test_collection_names_are_valid_readable_and_distinct() -> None:
    ids = ["clip-vit-b32", "clip_vit_b32", "hf-hub:timm/PE-Core-bigG-14-448", "é" * 300]
    names = [collection_name(model_id) for model_id in ids]
    assert len(set(names)) == len(ids)
    assert names[0].startswith("lv_clip_vit_b32_")
    for name in names:
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", name), name


def test_an_unserved_milvus_lite_path_is_a_clear_unavailable_error() -> None:
    with pytest.raises(
        MirrorUnavailable, match=r"milvus-lite at /data/mirror\.db is not being served"
    ):
        MilvusStore("/data/mirror.db")


def test_a_server_nobody_answers_is_unavailable_not_a_hang(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port bound by nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(MirrorUnavailable, match=re.escape(f"127.0.0.1:{port}")):
            MilvusStore(f"http://127.0.0.1:{port}", timeout=5)
