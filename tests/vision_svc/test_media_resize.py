"""smart_resize and the pixel math: defaults, bounds, aspect-ratio rule, patch order."""

from __future__ import annotations

import numpy as np
import pytest

from vision_svc.processing import AspectRatioError, InvalidMediaOptionsError, smart_resize
from vision_svc.processing.pixels import patchify
from vision_svc.processing.resize import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, patch_grid


def test_defaults_are_ernie_values() -> None:
    assert IMAGE_MIN_PIXELS == 56 * 56 == 4 * 28 * 28
    assert IMAGE_MAX_PIXELS == 28 * 28 * 6177


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        ((100, 100), (112, 112)),  # round to nearest 28
        ((1080, 1920), (1092, 1932)),
        ((10, 10), (56, 56)),  # grown to min_pixels
        ((4000, 6000), (1792, 2688)),  # shrunk under max_pixels
        ((28, 5000), (28, 5012)),
    ],
)
def test_known_sizes(hw: tuple[int, int], expected: tuple[int, int]) -> None:
    assert smart_resize(*hw) == expected


def test_bounds_hold_over_a_grid() -> None:
    for h in (1, 7, 27, 28, 29, 100, 333, 1000, 4321):
        for w in (1, 13, 56, 500, 1999, 4000):
            if max(h, w) / min(h, w) > 200:
                continue
            rh, rw = smart_resize(h, w, min_pixels=3136, max_pixels=28 * 28 * 64)
            assert rh % 28 == 0 and rw % 28 == 0
            assert rh * rw <= 28 * 28 * 64 or min(rh, rw) == 28
            assert rh * rw >= 3136


def test_aspect_ratio_rule() -> None:
    assert smart_resize(1, 200) == (28, 812)  # exactly 200 is allowed
    with pytest.raises(AspectRatioError, match="aspect ratio"):
        smart_resize(1, 201)
    with pytest.raises(AspectRatioError):
        smart_resize(5000, 20)
    assert issubclass(AspectRatioError, ValueError)


def test_bad_arguments() -> None:
    with pytest.raises(InvalidMediaOptionsError):
        smart_resize(0, 10)
    with pytest.raises(InvalidMediaOptionsError):
        smart_resize(10, 10, min_pixels=100, max_pixels=50)


def test_patch_grid() -> None:
    assert patch_grid(100, 100) == (8, 8)


def test_patchify_order_keeps_2x2_blocks_together() -> None:
    # Frame of 56x56 = 4x4 patches; fill each patch with its (row, col) id.
    t, c = 2, 3
    frames = np.zeros((t, c, 56, 56), np.float32)
    for f in range(t):
        for r in range(4):
            for col in range(4):
                frames[f, :, r * 14 : (r + 1) * 14, col * 14 : (col + 1) * 14] = (
                    f * 100 + r * 10 + col
                )
    patches, grid = patchify(frames)
    assert grid == (2, 4, 4) and patches.shape == (32, 3 * 14 * 14)
    ids = patches[:, 0].astype(int).tolist()
    # frame 0: block (0,0) = patches (0,0),(0,1),(1,0),(1,1); then block (0,1) ...
    assert ids[:8] == [0, 1, 10, 11, 2, 3, 12, 13]
    assert ids[8:16] == [20, 21, 30, 31, 22, 23, 32, 33]
    assert ids[16:20] == [100, 101, 110, 111]


def test_patch_row_is_channel_major() -> None:
    frames = np.zeros((1, 3, 28, 28), np.float32)
    frames[0, 1] = 1.0  # channel 1 only
    patches, _ = patchify(frames)
    row = patches[0].reshape(3, 14, 14)
    assert row[0].sum() == 0 and row[1].min() == 1 and row[2].sum() == 0
