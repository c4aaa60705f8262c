"""Drawn image/text pairs for `train`'s tests: coloured shapes with right and wrong titles."""

from __future__ import annotations

import csv
from pathlib import Path

from tests import images

COLOURS = ["red", "blue", "green", "gold"]
SHAPES = ["circle", "square", "triangle"]
SIZES = [(96, 80), (80, 96), (90, 90)]  # three drawings of each product


def next_of(items: list[str], item: str) -> str:
    return items[(items.index(item) + 1) % len(items)]


def draw(directory: Path, variants: int = 1) -> list[tuple[str, str, str]]:
    """(file, colour, shape) of each drawing, saved in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    drawn = []
    for variant in range(variants):
        for colour in COLOURS:
            for shape in SHAPES:
                name = f"{colour}-{shape}-{variant}.png"
                images.save(
                    images.product_image(colour, shape, SIZES[variant]), directory / name, "PNG"
                )
                drawn.append((name, colour, shape))
    return drawn


def write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> Path:
    with path.open("w", newline="") as file:
        csv.writer(file).writerows([header, *rows])
    return path


def contrastive_pairs(directory: Path, name: str = "pairs.csv", wrong: bool = False) -> Path:
    """Each drawing with its title; `wrong`: with the next colour's title instead."""
    rows = [
        (file, f"a {next_of(COLOURS, colour) if wrong else colour} {shape}")
        for file, colour, shape in draw(directory)
    ]
    return write_csv(directory / name, ("image", "text"), rows)


def labelled_pairs(directory: Path) -> Path:
    """Each drawing with its title (match) and with another product's title (mismatch)."""
    rows = []
    for file, colour, shape in draw(directory, variants=3):
        rows.append((file, f"a {colour} {shape}", "match"))
        rows.append((file, f"a {next_of(COLOURS, colour)} {next_of(SHAPES, shape)}", "mismatch"))
    return write_csv(directory / "labelled.csv", ("image", "text", "label"), rows)
