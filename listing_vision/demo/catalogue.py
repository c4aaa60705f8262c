"""A toy catalogue drawn with Pillow: coloured products with titles, some titles wrong.

The same generator trains the bundled toy model and builds the demo's sample catalogue (with
other seeds), so the demo measures the model on listings it has never seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 25),
    "yellow": (235, 205, 35),
    "green": (40, 155, 60),
    "blue": (40, 85, 215),
    "purple": (135, 55, 170),
    "pink": (240, 125, 185),
    "black": (35, 35, 35),
}
PRODUCTS = ("mug", "t-shirt", "handbag", "lamp", "umbrella", "water bottle", "chair", "hat")
TITLE_TEMPLATES = (
    "{colour} {product}",
    "{colour} {product} for sale",
    "classic {colour} {product}",
    "new {colour} {product}",
    "stylish {colour} {product} for the home",
    "{colour} {product}, good condition",
)

RGB = tuple[int, int, int]
Place = Callable[[float, float], tuple[float, float]]  # unit square -> canvas coordinates
Draw = Callable[[ImageDraw.ImageDraw, Place, RGB], None]


def _mug(d: ImageDraw.ImageDraw, p: Place, c: RGB) -> None:
    d.rectangle([p(0.25, 0.3), p(0.65, 0.85)], fill=c)
    d.ellipse(
        [p(0.55, 0.42), p(0.85, 0.72)], outline=c, width=max(2, int(p(0.07, 0)[0] - p(0, 0)[0]))
    )


def _tshirt(d: ImageDraw.ImageDraw, p: Place, c: RGB) -> None:
    points = [
        (0.35, 0.2),
        (0.65, 0.2),
        (0.9, 0.35),
        (0.8, 0.48),
        (0.7, 0.42),
        (0.7, 0.88),
        (0.3, 0.88),
        (0.3, 0.42),
        (0.2, 0.48),
        (0.1, 0.35),
    ]
    d.polygon([p(x, y) for x, y in points], fill=c)


def _handbag(d: ImageDraw.ImageDraw, p: Place, c: RGB) -> None:
    d.arc(
        [p(0.32, 0.15), p(0.68, 0.55)],
        180,
        360,
        fill=c,
        width=max(2, int(p(0.05, 0)[0] - p(0, 0)[0])),
    )
    d.polygon([p(0.2, 0.38), p(0.8, 0.38), p(0.88, 0.85), p(0.12, 0.85)], fill=c)


def _lamp(d: ImageDraw.ImageDraw, p: Place, c: RGB) -> None:
    d.polygon([p(0.35, 0.12), p(0.65, 0.12), p(0.8, 0.42), p(0.2, 0.42)], fill=c)
    d.rectangle([p(0.47, 0.42), p(0.53, 0.8)], fill=c)
    d.rectangle([p(0.3, 0.8), p(0.7, 0.88)], fill=c)


def _umbrella(d: ImageDraw.ImageDraw, p: Place, c: RGB) -> None:
    d.pieslice([p(0.1, 0.15), p(0.9, 0.75)], 180, 360, fill=c)
    d.rectangle([p(0.48, 0.44), p(0.52, 0.82)], fill=c)
    d.arc(
        [p(0.38, 0.74), p(0.52, 0.9)], 0, 180, fill=c, width=max(2, int(p(0.04, 0)[0] - p(0, 0)[0]))
    )


def _bottle(d: ImageDraw.ImageDraw, p: Place, c: RGB) -> None:
    d.rounded_rectangle(
        [p(0.35, 0.32), p(0.65, 0.9)], radius=max(2, int(p(0.08, 0)[0] - p(0, 0)[0])), fill=c
    )
    d.rectangle([p(0.44, 0.16), p(0.56, 0.34)], fill=c)
    d.rectangle([p(0.42, 0.1), p(0.58, 0.17)], fill=(90, 90, 90))


def _chair(d: ImageDraw.ImageDraw, p: Place, c: RGB) -> None:
    d.rectangle([p(0.28, 0.12), p(0.36, 0.6)], fill=c)
    d.rectangle([p(0.28, 0.52), p(0.75, 0.6)], fill=c)
    d.rectangle([p(0.28, 0.6), p(0.34, 0.9)], fill=c)
    d.rectangle([p(0.69, 0.6), p(0.75, 0.9)], fill=c)


def _hat(d: ImageDraw.ImageDraw, p: Place, c: RGB) -> None:
    d.ellipse([p(0.1, 0.58), p(0.9, 0.78)], fill=c)
    d.chord([p(0.28, 0.25), p(0.72, 0.95)], 180, 360, fill=c)


_DRAW: dict[str, Draw] = {
    "mug": _mug,
    "t-shirt": _tshirt,
    "handbag": _handbag,
    "lamp": _lamp,
    "umbrella": _umbrella,
    "water bottle": _bottle,
    "chair": _chair,
    "hat": _hat,
}


def draw_product(colour: str, product: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One photo-like drawing: varied background, scale, position, rotation, tint and noise."""
    background: RGB = (rng.randint(205, 255), rng.randint(205, 255), rng.randint(205, 255))
    image = Image.new("RGB", (size, size), background)
    scale = rng.uniform(0.75, 1.0) * size
    left = rng.uniform(0, size - scale)
    top = rng.uniform(0, size - scale)

    def place(x: float, y: float) -> tuple[float, float]:
        return (left + x * scale, top + y * scale)

    red, green, blue = (max(0, min(255, v + rng.randint(-18, 18))) for v in COLOURS[colour])
    _DRAW[product](ImageDraw.Draw(image), place, (red, green, blue))
    image = image.rotate(
        rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, fillcolor=background
    )
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * size / 64))
    return image


def title_for(colour: str, product: str, rng: random.Random) -> str:
    return rng.choice(TITLE_TEMPLATES).format(colour=colour, product=product)


@dataclass(frozen=True)
class DemoListing:
    """A sample listing and the truth about it (for precision and recall)."""

    listing_id: str
    title: str
    image: Path
    category: str
    shows_colour: str
    shows_product: str
    planted_mismatch: bool
    planted_wrong_category: bool

    def event(self) -> dict[str, str]:
        """The listing event the catalogue would send for it."""
        return {
            "listing_id": self.listing_id,
            "title": self.title,
            "image_url": self.image.as_uri(),
            "category": self.category,
        }


def make_catalogue(
    directory: Path, count: int, *, mismatch_rate: float = 0.25, seed: int = 7, size: int = 192
) -> list[DemoListing]:
    """Draw `count` listings into `directory`; about `mismatch_rate` have a title that names a
    different colour or product than the photo shows, and as many claim a wrong category."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    listings = []
    for index in range(count):
        colour, product = rng.choice(list(COLOURS)), rng.choice(PRODUCTS)
        said_colour, said_product = colour, product
        mismatch = rng.random() < mismatch_rate
        if mismatch:
            said_colour, said_product = _wrong_description(colour, product, rng)
        wrong_category = rng.random() < mismatch_rate
        claimed = rng.choice([p for p in PRODUCTS if p != product]) if wrong_category else product
        path = directory / f"listing-{index:04d}.jpg"
        draw_product(colour, product, rng, size).save(path, quality=90)
        listings.append(
            DemoListing(
                listing_id=f"demo-{index:04d}",
                title=title_for(said_colour, said_product, rng),
                image=path,
                category=claimed,
                shows_colour=colour,
                shows_product=product,
                planted_mismatch=mismatch,
                planted_wrong_category=wrong_category,
            )
        )
    return listings


def _wrong_description(colour: str, product: str, rng: random.Random) -> tuple[str, str]:
    """Another colour, another product, or both: the mismatches sellers really make."""
    kind = rng.choice(("colour", "product", "both"))
    other_colour = rng.choice([c for c in COLOURS if c != colour])
    other_product = rng.choice([p for p in PRODUCTS if p != product])
    if kind == "colour":
        return other_colour, product
    if kind == "product":
        return colour, other_product
    return other_colour, other_product


def training_texts(
    colour: str, product: str, rng: random.Random, templates: tuple[str, ...]
) -> str:
    """A text for a training pair: a listing title, or a category prompt (so zero-shot works)."""
    if rng.random() < 0.7:
        return title_for(colour, product, rng)
    subject = product if rng.random() < 0.5 else f"{colour} {product}"
    return rng.choice(templates).format(subject)
