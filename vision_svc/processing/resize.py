"""ERNIE-4.5-VL `smart_resize`: choose the resized (h, w) of an image or video frame.

Follows HF `transformers` (`image_processing_pil_ernie4_5_vl_moe.smart_resize`) exactly,
including raising for aspect ratios above 200. FastDeploy's variant differs in two corner
cases: it clamps (instead of rejecting) aspect ratios above 200, and it rounds each side to at
least one factor before the pixel checks. For every input both accept, they agree.
"""

from __future__ import annotations

import math

from vision_svc.processing.errors import AspectRatioError, InvalidMediaOptionsError

PATCH_SIZE = 14
"""ViT patch side in pixels."""
MERGE_SIZE = 2
"""Spatial merge of the resampler: 2x2 patches become one LM token."""
TEMPORAL_MERGE = 2
"""Temporal merge of the resampler for video: 2 frames become one LM token column."""
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: both resized sides are multiples of this

IMAGE_MIN_PIXELS = 4 * 28 * 28  # 3136 == HF size["shortest_edge"] == FastDeploy image_min_pixels
IMAGE_MAX_PIXELS = 6177 * 28 * 28  # 4842768 == HF size["longest_edge"]
VIDEO_MIN_PIXELS = 299 * 28 * 28  # HF video processor / FastDeploy video_min_pixels
VIDEO_MAX_PIXELS = 1196 * 28 * 28
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """Return (h, w), both multiples of `factor`, area near [min_pixels, max_pixels], same aspect.

    Raises `AspectRatioError` when max(h, w) / min(h, w) > 200 and `InvalidMediaOptionsError`
    for non-positive sizes or pixel bounds.
    """
    if height <= 0 or width <= 0:
        raise InvalidMediaOptionsError(f"image size must be positive, got {height}x{width}")
    if factor <= 0 or min_pixels <= 0 or max_pixels < min_pixels:
        raise InvalidMediaOptionsError(
            f"bad resize bounds: factor={factor} min_pixels={min_pixels} max_pixels={max_pixels}"
        )
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise AspectRatioError(
            f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got {ratio:.1f} "
            f"({width}x{height})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        # Shrink by the exact area ratio, then floor so we never exceed max_pixels.
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        # Grow by the exact area ratio, then ceil so we reach min_pixels.
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patch_grid(
    height: int,
    width: int,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """Return the (grid_h, grid_w) in ViT patches an image of this size is resized to."""
    h, w = smart_resize(height, width, FACTOR, min_pixels, max_pixels)
    return h // PATCH_SIZE, w // PATCH_SIZE
