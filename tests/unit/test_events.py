"""producer.events: every field rule of the SPEC listing event, refusals naming line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from producer.events import ListingEvent, Refusal, parse_event, parse_lines

URL = "https://cdn.example.com/a.jpg"


def event(**fields: Any) -> dict[str, Any]:
    """A valid event with `fields` replaced (a value of `...` removes the field)."""
    base: dict[str, Any] = {"listing_id": "sku-123", "title": "Red leather handbag"}
    base["image_urls"] = [URL]
    base.update(fields)
    return {key: value for key, value in base.items() if value is not ...}


def accepted(raw: Any, file_roots: tuple[Path, ...] = ()) -> ListingEvent:
    parsed = parse_event(raw, 1, file_roots)
    assert isinstance(parsed, ListingEvent), parsed
    return parsed


def refused(raw: Any, file_roots: tuple[Path, ...] = (), line: int = 1) -> Refusal:
    parsed = parse_event(raw, line, file_roots)
    assert isinstance(parsed, Refusal), parsed
    return parsed


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A file root holding one image, with a sibling directory outside it."""
    inside = tmp_path / "images"
    inside.mkdir()
    (inside / "a.jpg").write_bytes(b"jpeg")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "b.jpg").write_bytes(b"jpeg")
    return inside.resolve()


def assert_outside_roots(refusal: Refusal) -> None:
    assert refusal.message.startswith("image_urls.0:")
    assert "LV_FILE_ROOTS" in refusal.message
    assert "outside" in refusal.message


# --- a valid event ---------------------------------------------------------------------------


def test_the_spec_example_is_accepted() -> None:
    raw = {
        "listing_id": "sku-123",
        "title": "Red leather handbag",
        "description": "…",
        "image_urls": ["https://cdn.example.com/a.jpg"],
        "category": "handbag",
    }

    parsed = accepted(raw)

    assert parsed.listing_id == "sku-123"
    assert parsed.title == "Red leather handbag"
    assert parsed.description == "…"
    assert parsed.image_urls == ("https://cdn.example.com/a.jpg",)
    assert parsed.category == "handbag"


def test_description_and_category_are_optional() -> None:
    parsed = accepted(event())

    assert parsed.description is None
    assert parsed.category is None


def test_to_record_carries_every_field() -> None:
    record = accepted(event(description="Soft", category="handbag")).to_record()

    assert record.listing_id == "sku-123"
    assert record.title == "Red leather handbag"
    assert record.description == "Soft"
    assert record.category == "handbag"
    assert record.image_urls == [URL]


def test_extra_fields_are_ignored() -> None:
    parsed = accepted(event(price=12.5, seller={"id": 7}))

    assert not hasattr(parsed, "price")
    assert "seller" not in parsed.model_dump()


# --- listing_id ------------------------------------------------------------------------------


@pytest.mark.parametrize("listing_id", ["a", "A-z_0.9:x", "x" * 128])
def test_listing_id_within_the_pattern_is_accepted(listing_id: str) -> None:
    assert accepted(event(listing_id=listing_id)).listing_id == listing_id


@pytest.mark.parametrize(
    "listing_id",
    ["", "x" * 129, "sku 123", "sku/123", "skü", "a\nb", "sku;drop"],
    ids=["empty", "129-chars", "space", "slash", "non-ascii", "newline", "semicolon"],
)
def test_listing_id_outside_the_pattern_is_refused(listing_id: str) -> None:
    assert refused(event(listing_id=listing_id)).message.startswith("listing_id:")


def test_missing_listing_id_is_refused_naming_the_field() -> None:
    refusal = refused(event(listing_id=...))

    assert "listing_id" in refusal.message
    assert refusal.listing_id is None


def test_numeric_listing_id_is_refused() -> None:
    assert "listing_id" in refused(event(listing_id=123)).message


# --- title, description, category ------------------------------------------------------------


def test_missing_title_is_refused() -> None:
    assert refused(event(title=...)).message.startswith("title:")


@pytest.mark.parametrize("title", ["", "   "], ids=["empty", "blank"])
def test_empty_title_is_refused(title: str) -> None:
    assert refused(event(title=title)).message.startswith("title:")


def test_title_of_500_characters_is_accepted() -> None:
    assert len(accepted(event(title="t" * 500)).title) == 500


def test_title_over_500_characters_is_refused() -> None:
    refusal = refused(event(title="t" * 501))

    assert refusal.message.startswith("title:")
    assert "500" in refusal.message


def test_description_of_5000_characters_is_accepted() -> None:
    assert accepted(event(description="d" * 5000)).description == "d" * 5000


def test_description_over_5000_characters_is_refused() -> None:
    refusal = refused(event(description="d" * 5001))

    assert refusal.message.startswith("description:")
    assert "5000" in refusal.message


def test_null_description_is_accepted() -> None:
    assert accepted(event(description=None)).description is None


# --- image URLs ------------------------------------------------------------------------------


def test_twelve_image_urls_are_accepted() -> None:
    urls = [f"https://cdn.example.com/{i}.jpg" for i in range(12)]

    assert accepted(event(image_urls=urls)).image_urls == tuple(urls)


def test_thirteen_image_urls_are_refused() -> None:
    urls = [f"https://cdn.example.com/{i}.jpg" for i in range(13)]

    refusal = refused(event(image_urls=urls))

    assert refusal.message.startswith("image_urls:")
    assert "12" in refusal.message


def test_an_empty_image_url_list_is_refused() -> None:
    assert refused(event(image_urls=[])).message.startswith("image_urls:")


def test_an_event_without_images_is_refused() -> None:
    assert "image_urls" in refused(event(image_urls=...)).message


def test_a_single_image_url_is_accepted_as_image_urls() -> None:
    parsed = accepted(event(image_urls=..., image_url=URL))

    assert parsed.image_urls == (URL,)


def test_image_url_and_image_urls_together_are_refused() -> None:
    refusal = refused(event(image_url="https://cdn.example.com/b.jpg"))

    assert "image_url" in refusal.message
    assert "image_urls" in refusal.message
    assert "not both" in refusal.message


@pytest.mark.parametrize(
    "url", ["http://cdn.example.com/a.jpg", "https://cdn.example.com/a.jpg?w=800"]
)
def test_http_and_https_urls_are_accepted(url: str) -> None:
    assert accepted(event(image_urls=[url])).image_urls == (url,)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://cdn.example.com/a.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "gopher://cdn.example.com/a",
        "//cdn.example.com/a.jpg",
        "cdn.example.com/a.jpg",
    ],
)
def test_other_schemes_are_refused(url: str) -> None:
    refusal = refused(event(image_urls=[URL, url]))

    assert refusal.message.startswith("image_urls.1:")
    assert "scheme" in refusal.message


@pytest.mark.parametrize("url", ["http:///a.jpg", "https://:443/a.jpg", "https:a.jpg"])
def test_url_without_a_host_is_refused(url: str) -> None:
    refusal = refused(event(image_urls=[url]))

    assert refusal.message.startswith("image_urls.0:")
    assert "no host" in refusal.message


def test_overlong_url_is_refused() -> None:
    url = "https://cdn.example.com/" + "a" * 3000

    assert "longer than" in refused(event(image_urls=[url])).message


def test_file_url_is_refused_without_file_roots(root: Path) -> None:
    refusal = refused(event(image_urls=[(root / "a.jpg").as_uri()]), file_roots=())

    assert refusal.message.startswith("image_urls.0:")
    assert "LV_FILE_ROOTS" in refusal.message


def test_file_url_under_a_file_root_is_accepted(root: Path) -> None:
    url = (root / "a.jpg").as_uri()

    assert accepted(event(image_urls=[url]), file_roots=(root,)).image_urls == (url,)


def test_file_url_in_a_subdirectory_of_a_file_root_is_accepted(root: Path) -> None:
    url = (root / "deeper" / "a.jpg").as_uri()

    assert accepted(event(image_urls=[url]), file_roots=(root,)).image_urls == (url,)


def test_file_url_outside_the_file_roots_is_refused(root: Path) -> None:
    url = (root.parent / "secret" / "b.jpg").as_uri()

    refusal = refused(event(image_urls=[url]), file_roots=(root,))

    assert_outside_roots(refusal)


@pytest.mark.parametrize(
    "suffix", ["../secret/b.jpg", "%2e%2e/secret/b.jpg", "./../../../etc/passwd"]
)
def test_file_url_escaping_a_root_with_dot_dot_is_refused(root: Path, suffix: str) -> None:
    url = f"file://{root}/{suffix}"

    refusal = refused(event(image_urls=[url]), file_roots=(root,))

    assert_outside_roots(refusal)


def test_file_url_through_a_symlink_leading_out_of_a_root_is_refused(root: Path) -> None:
    (root / "link").symlink_to(root.parent / "secret")

    refusal = refused(event(image_urls=[f"file://{root}/link/b.jpg"]), file_roots=(root,))

    assert_outside_roots(refusal)


def test_a_root_name_prefix_is_not_a_root(root: Path) -> None:
    sibling = root.parent / (root.name + "-other")
    sibling.mkdir()

    refusal = refused(event(image_urls=[(sibling / "a.jpg").as_uri()]), file_roots=(root,))

    assert_outside_roots(refusal)


def test_the_refusal_names_the_first_bad_url_by_index(root: Path) -> None:
    urls = [URL, URL, "ftp://cdn.example.com/c.jpg", "ftp://cdn.example.com/d.jpg"]

    assert refused(event(image_urls=urls)).message.startswith("image_urls.2:")


def test_file_url_naming_a_host_is_refused_at_enqueue(root: Path) -> None:
    # the worker never reads another machine's files, so the producer must not accept them
    url = f"file://files.example.com{root}/a.jpg"

    refusal = refused(event(image_urls=[url]), file_roots=(root,))

    assert refusal.message.startswith("image_urls.0:")
    assert "files.example.com" in refusal.message


def test_file_url_naming_localhost_is_accepted(root: Path) -> None:
    url = f"file://localhost{root}/a.jpg"

    assert accepted(event(image_urls=[url]), file_roots=(root,)).image_urls == (url,)


def test_relative_file_url_is_refused_at_enqueue(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(root)  # even where the relative path would land inside a root

    refusal = refused(event(image_urls=["file:a.jpg"]), file_roots=(root,))

    assert refusal.message.startswith("image_urls.0:")
    assert "absolute" in refusal.message


# --- refusals and lines ----------------------------------------------------------------------


def test_a_refusal_names_its_line_listing_and_field() -> None:
    refusal = refused(event(title="t" * 501), line=42)

    assert refusal.line == 42
    assert refusal.listing_id == "sku-123"
    assert str(refusal).startswith("line 42 (sku-123): title:")


def test_every_broken_field_is_named_in_one_refusal() -> None:
    refusal = refused({"listing_id": "bad id", "title": "", "image_urls": []})

    for field in ("listing_id:", "title:", "image_urls:"):
        assert field in refusal.message


def test_a_refusal_without_a_usable_listing_id_names_only_the_line() -> None:
    refusal = refused(event(listing_id=["not", "a", "string"]), line=3)

    assert refusal.listing_id is None
    assert str(refusal).startswith("line 3: ")


def test_parse_lines_sorts_valid_and_refused_lines() -> None:
    lines = [
        json.dumps(event(listing_id="ok-1")),
        json.dumps(event(listing_id="bad-1", title="")),
        json.dumps(event(listing_id="ok-2")),
    ]

    events, refusals = parse_lines(lines, ())

    assert [e.listing_id for e in events] == ["ok-1", "ok-2"]
    assert [(r.line, r.listing_id) for r in refusals] == [(2, "bad-1")]
    assert refusals[0].message.startswith("title:")


def test_invalid_json_line_is_refused_with_its_number() -> None:
    lines = [json.dumps(event()), '{"listing_id": "x", ', json.dumps(event())]

    events, refusals = parse_lines(lines, ())

    assert len(events) == 2
    assert len(refusals) == 1
    assert refusals[0].line == 2
    assert refusals[0].listing_id is None
    assert "not valid JSON" in refusals[0].message


@pytest.mark.parametrize("line", ["[1, 2]", '"sku-123"', "42", "null", "true"])
def test_a_line_that_is_not_a_json_object_is_refused(line: str) -> None:
    events, refusals = parse_lines([line], ())

    assert events == []
    assert [(r.line, r.message) for r in refusals] == [(1, "expected a JSON object")]


def test_blank_lines_are_skipped_but_still_counted() -> None:
    lines = ["", "   ", "\t\n", json.dumps(event(title=""))]

    events, refusals = parse_lines(lines, ())

    assert events == []
    assert [r.line for r in refusals] == [4]


def test_first_line_offsets_the_line_numbers() -> None:
    lines = [json.dumps(event()), "not json"]

    _, refusals = parse_lines(lines, (), first_line=101)

    assert [r.line for r in refusals] == [102]


def test_lines_with_trailing_newlines_and_crlf_parse() -> None:
    lines = [json.dumps(event(listing_id="a")) + "\n", json.dumps(event(listing_id="b")) + "\r\n"]

    events, refusals = parse_lines(lines, ())

    assert [e.listing_id for e in events] == ["a", "b"]
    assert refusals == []


def test_parse_lines_checks_file_urls_against_the_roots(root: Path) -> None:
    inside = json.dumps(event(listing_id="in", image_urls=[(root / "a.jpg").as_uri()]))
    outside = json.dumps(event(listing_id="out", image_urls=["file:///etc/passwd"]))

    events, refusals = parse_lines([inside, outside], (root,))

    assert [e.listing_id for e in events] == ["in"]
    assert [(r.line, r.listing_id) for r in refusals] == [(2, "out")]


def test_a_malformed_url_is_refused_not_a_crash() -> None:
    refusal = refused(event(image_urls=["http://[::1/a.jpg"]))
    assert refusal.message.startswith("image_urls.0: malformed URL")


# --- events built in Python ------------------------------------------------------------------


def test_an_event_built_without_roots_leaves_its_file_urls_to_be_judged(root: Path) -> None:
    inside = ListingEvent(listing_id="a", title="t", image_urls=((root / "a.jpg").as_uri(),))
    outside = ListingEvent(
        listing_id="b", title="t", image_urls=((root.parent / "secret" / "b.jpg").as_uri(),)
    )

    assert inside.file_url_problem((root,)) is None
    problem = outside.file_url_problem((root,))
    assert problem is not None and problem.startswith("image_urls.0:") and "outside" in problem
    assert "none is configured" in str(inside.file_url_problem(()))


def test_an_event_parsed_under_the_same_roots_is_not_judged_again(root: Path) -> None:
    parsed = accepted(event(image_urls=[(root / "a.jpg").as_uri()]), (root,))
    # Judged against `root`: taken as it is. Against other roots it is judged afresh.
    assert parsed.file_url_problem((root,)) is None
    assert parsed.file_url_problem(()) is not None


def test_an_event_built_in_python_still_refuses_a_bad_http_url() -> None:
    with pytest.raises(ValueError, match="scheme"):
        ListingEvent(listing_id="a", title="t", image_urls=("ftp://host/a.jpg",))
