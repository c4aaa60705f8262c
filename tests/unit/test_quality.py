"""worker.quality: blur (Laplacian variance) and brightness of decoded pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from worker.quality import laplacian_variance, measure_quality


def checkerboard(side: int = 256, square: int = 8) -> Image.Image:
    cells = (np.indices((side, side)) // square).sum(axis=0) % 2
    return Image.fromarray((cells * 255).astype(np.uint8)).convert("RGB")


def test_a_sharp_checkerboard_scores_higher_blur_than_its_blurred_copy() -> None:
    sharp = checkerboard()
    blurred = sharp.filter(ImageFilter.GaussianBlur(radius=3))

    sharp_score = measure_quality(sharp).blur
    blurred_score = measure_quality(blurred).blur

    assert sharp_score > 0
    assert sharp_score > 5 * blurred_score


def test_more_blur_gives_a_lower_score() -> None:
    scores = [
        measure_quality(checkerboard().filter(ImageFilter.GaussianBlur(radius))).blur
        for radius in (0.5, 2, 6)
    ]

    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) == 3


def test_a_flat_image_has_zero_blur_score() -> None:
    assert measure_quality(Image.new("RGB", (64, 64), (90, 120, 200))).blur == 0.0


def test_white_is_bright_and_black_is_dark() -> None:
    white = measure_quality(Image.new("RGB", (32, 32), (255, 255, 255)))
    black = measure_quality(Image.new("RGB", (32, 32), (0, 0, 0)))

    assert white.brightness == pytest.approx(1.0, abs=1e-6)
    assert black.brightness == pytest.approx(0.0, abs=1e-6)


def test_mid_grey_has_brightness_near_one_half() -> None:
    assert measure_quality(Image.new("RGB", (32, 32), (128, 128, 128))).brightness == (
        pytest.approx(128 / 255, abs=1e-3)
    )


def test_brightness_weights_green_over_blue_as_luma_does() -> None:
    green = measure_quality(Image.new("RGB", (8, 8), (0, 255, 0))).brightness
    blue = measure_quality(Image.new("RGB", (8, 8), (0, 0, 255))).brightness

    assert 0 < blue < green < 1


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (2, 50), (50, 2)])
def test_tiny_images_score_zero_blur_without_crashing(size: tuple[int, int]) -> None:
    quality = measure_quality(checkerboard(64, 1).resize(size, Image.Resampling.NEAREST))

    assert quality.blur == 0.0
    assert 0.0 <= quality.brightness <= 1.0


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_measuring_leaves_the_callers_image_untouched(mode: str) -> None:
    image = checkerboard(600, 8).convert(mode)
    before = np.asarray(image).copy()

    measure_quality(image)

    assert image.size == (600, 600)
    assert image.mode == mode
    assert np.array_equal(np.asarray(image), before)


def test_laplacian_variance_matches_a_hand_computation() -> None:
    luma = np.zeros((3, 3), dtype=np.float32)
    luma[1, 1] = 10.0  # the single interior pixel's Laplacian is -40: variance of one value is 0
    assert laplacian_variance(luma) == 0.0

    luma = np.zeros((3, 4), dtype=np.float32)
    luma[1, 1] = 10.0  # interior Laplacians: (1,1) = -40, (1,2) = 10
    assert laplacian_variance(luma) == pytest.approx(np.var([-40.0, 10.0]))


def test_laplacian_variance_of_arrays_under_three_by_three_is_zero() -> None:
    assert laplacian_variance(np.ones((2, 10), dtype=np.float32)) == 0.0
    assert laplacian_variance(np.ones((10, 2), dtype=np.float32)) == 0.0


def test_the_same_scene_uploaded_at_twice_the_size_scores_about_the_same_blur() -> None:
    native = measure_quality(checkerboard(256, 8)).blur
    doubled = measure_quality(checkerboard(512, 16)).blur

    assert doubled == pytest.approx(native, rel=0.25)
