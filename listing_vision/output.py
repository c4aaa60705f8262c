"""How results and the registry look in a terminal (rich tables, JSON lines)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Table

from contract.registry import ModelSpec


def print_results_table(console: Console, rows: list[dict[str, Any]]) -> None:
    """`listing_results` rows as a table (errors cut to one line)."""
    table = Table(show_lines=False)
    for column in ("seq", "listing", "model", "status", "sim.", "match", "category", "claim ok"):
        table.add_column(column, no_wrap=True)
    table.add_column("error", overflow="ellipsis", no_wrap=True, max_width=60)
    for row in rows:
        table.add_row(
            str(row["change_seq"]),
            row["listing_id"],
            row["model_id"],
            row["status"],
            _number(row["similarity"]),
            _flag(row["is_match"]),
            row["top_category"] or "",
            _flag(None if row["category_mismatch"] is None else not row["category_mismatch"]),
            row["error"] or "",
        )
    console.print(table)


def print_results_jsonl(rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per row, as a program would read them."""
    for row in rows:
        print(json.dumps(row, default=str, ensure_ascii=False))


def print_models_table(console: Console, specs: Iterable[ModelSpec], active: str) -> None:
    """The registry, the active model marked."""
    table = Table()
    for column in ("", "id", "backend", "name", "pretrained", "threshold", "source"):
        table.add_column(column, overflow="fold")
    for spec in specs:
        table.add_row(
            "*" if spec.model_id == active else "",
            spec.model_id,
            spec.backend,
            spec.name,
            spec.pretrained or "",
            "" if spec.threshold is None else f"{spec.threshold:g}",
            spec.source,
        )
    console.print(table)
    console.print("* active model (analysis jobs use it unless --model names another)")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _flag(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")


def print_neighbours(console: Console, rows: list[dict[str, Any]], format: str) -> None:
    """`similar`'s answer as a table or JSON lines."""
    if format == "jsonl":
        print_results_jsonl(rows)
        return
    table = Table()
    for column in ("listing", "cosine similarity", "title"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["listing_id"], f"{row['similarity']:.4f}", row["title"] or "")
    console.print(table)
