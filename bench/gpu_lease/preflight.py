"""A minute's first look at nvJPEG on a lent GPU, before the GPU tests and the bench: does it
decode, how far are its pixels from Pillow's, does a broken or RGB-stored JPEG come out wrong,
does the prepare step's own stream keep the decoder off memory the model's stream still uses
(pytorch/vision#9606), and how fast does it decode. Prints and writes JSON (`--out DIR`)."""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from listing_vision.demo.catalogue import COLOURS, PRODUCTS, draw_product
from worker.decode import decode_image
from worker.prepare_stream import PrepareStream
from worker.tensor_input import EncodedJpeg, decode_jpegs, encoded_jpeg

MAX_PIXELS = 40_000_000


def jpeg_bytes(image: Image.Image, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def photos(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Product drawings with noise: colour edges, where decoders' chroma upsampling differs."""
    rng = random.Random(seed)
    colours, products = sorted(COLOURS), sorted(PRODUCTS)
    drawn = []
    for _ in range(count):
        image = draw_product(rng.choice(colours), rng.choice(products), rng, size=size)
        noise = np.random.default_rng(rng.randint(0, 1 << 30)).integers(-12, 13, (size, size, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        drawn.append(Image.fromarray(pixels))
    return drawn


def encoded(blobs: list[bytes]) -> list[EncodedJpeg]:
    items = [encoded_jpeg(blob, MAX_PIXELS) for blob in blobs]
    assert all(item is not None for item in items), "a test JPEG was not left for nvJPEG"
    return [item for item in items if item is not None]


def pillow_pixels(blob: bytes) -> torch.Tensor:
    decoded = decode_image(blob, max_pixels=MAX_PIXELS)
    return torch.from_numpy(np.array(decoded.pixels, dtype=np.uint8)).permute(2, 0, 1)


def against_pillow(cuda: torch.device) -> dict[str, Any]:
    blobs = [jpeg_bytes(image) for image in photos(16, 512)]
    blobs.append(jpeg_bytes(photos(1, 512, seed=1)[0].convert("L")))
    got = decode_jpegs(encoded(blobs), cuda, max_pixels=MAX_PIXELS)
    means = []
    for blob, image in zip(blobs, got, strict=True):
        assert isinstance(image, torch.Tensor) and image.device == cuda
        means.append((image.cpu().float() - pillow_pixels(blob).float()).abs().mean().item())
    return {"mean_abs_difference": round(max(means), 3), "per_image": [round(m, 3) for m in means]}


def odd_jpegs(cuda: torch.device) -> dict[str, Any]:
    """A JPEG with a bogus marker in its scan (libjpeg and Pillow refuse it; nvJPEG is
    lenient by default) and one stored as RGB (Adobe transform 0)."""
    good = jpeg_bytes(photos(1, 256, seed=2)[0])
    scan = good.index(b"\xff\xda") + 100
    broken = good[:scan] + b"\xff\xc0\xff\xff" + good[scan + 4 :]
    rgb_stored = jpeg_bytes(photos(1, 256, seed=3)[0], keep_rgb=True)
    report: dict[str, Any] = {}
    item = encoded_jpeg(broken, MAX_PIXELS)
    if item is None:
        report["broken"] = "left to Pillow"
    else:
        (image,) = decode_jpegs([item], cuda, max_pixels=MAX_PIXELS)
        report["broken"] = "refused" if isinstance(image, Exception) else "decoded (garbage)"
    item = encoded_jpeg(rgb_stored, MAX_PIXELS)
    if item is None:
        report["adobe_rgb"] = "left to Pillow"
    else:
        (rgb,) = decode_jpegs([item], cuda, max_pixels=MAX_PIXELS)
        if isinstance(rgb, Exception):
            report["adobe_rgb"] = f"refused: {rgb}"
        else:
            difference = (rgb.cpu().float() - pillow_pixels(rgb_stored).float()).abs().mean()
            report["adobe_rgb_mean_abs_difference"] = round(difference.item(), 3)
    return report


def free_while_busy(device: torch.device, size: int) -> None:
    """The #9606 pattern on the current (the model's) stream: blocks of `size` bytes written by
    a long queue of kernels and freed before those kernels ran (their blocks go back at once)."""
    busy = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(64)]
    for tensor in busy:
        for _ in range(20):
            tensor.add_(1)


def race(cuda: torch.device, own_stream: bool, rounds: int = 30) -> int:
    """Images decoded wrong while the default stream frees memory its queued kernels still
    write (the #9606 pattern), decoding in another thread as the prepare thread does."""
    blobs = encoded([jpeg_bytes(image) for image in photos(16, 640, seed=4)])
    stream = PrepareStream(cuda if own_stream else torch.device("cpu"))  # cpu: a plain call

    def decode() -> list[torch.Tensor]:
        out = stream.run(
            lambda: decode_jpegs(blobs, cuda, max_pixels=MAX_PIXELS), lambda images: images
        )
        return [image.cpu() for image in out if isinstance(image, torch.Tensor)]

    reference = decode()
    wrong = 0
    for _ in range(rounds):
        free_while_busy(cuda, 3 * 640 * 640)
        with ThreadPoolExecutor(1) as thread:
            got = thread.submit(decode).result()
        wrong += sum(not torch.equal(a, b) for a, b in zip(got, reference, strict=True))
    torch.cuda.synchronize()
    return wrong


def decode_rate(cuda: torch.device, batch: int = 256) -> float:
    blobs = encoded([jpeg_bytes(image) for image in photos(32, 800, seed=5)] * (batch // 32))
    decode_jpegs(blobs, cuda, max_pixels=MAX_PIXELS)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(3):
        decode_jpegs(blobs, cuda, max_pixels=MAX_PIXELS)
    torch.cuda.synchronize()
    return round(3 * len(blobs) / (time.perf_counter() - started), 1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_lease.preflight")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    report: dict[str, Any] = {"cuda": torch.cuda.is_available(), "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each step: a step cut short keeps the ones before
        (args.out / "preflight.json").write_text(json.dumps(report, indent=2) + "\n")

    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        report["device"] = torch.cuda.get_device_name()
        steps: dict[str, Callable[[], Any]] = {
            "against_pillow": lambda: against_pillow(cuda),
            "odd_jpegs": lambda: odd_jpegs(cuda),
            "race_wrong_images_default_stream": lambda: race(cuda, own_stream=False),
            "race_wrong_images_own_stream": lambda: race(cuda, own_stream=True),
            "nvjpeg_800px_images_per_s": lambda: decode_rate(cuda),
        }
        for name, step in steps.items():
            started = time.perf_counter()
            try:
                report[name] = step()
            except Exception as error:  # each step on its own: a lease is short
                report[name] = f"error: {type(error).__name__}: {error}"
            print(f"{name} ({time.perf_counter() - started:.1f} s): {report[name]}", flush=True)
            save()
    save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
