"""`MediaProcessor`: bytes in, model-ready pixels out, with the counts the gateway needs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from vision_svc.processing.config import MediaConfig
from vision_svc.processing.errors import InvalidMediaOptionsError
from vision_svc.processing.hashing import content_hash
from vision_svc.processing.image import decode_image, preprocess_image
from vision_svc.processing.resize import MERGE_SIZE, TEMPORAL_MERGE, patch_grid
from vision_svc.processing.video import preprocess_video, sample_video

MediaKind = Literal["image", "video"]


@dataclass(frozen=True)
class ProcessedMedia:
    """One preprocessed image or video, ready for the vision tower.

    For an image `pixel_values` is [gh*gw, 588] and grid (1, gh, gw); for a video it is
    [T*gh*gw, 588] with grid (T, gh, gw), T even. 588 = 3 channels * 14 * 14.
    """

    kind: MediaKind
    pixel_values: np.ndarray
    """float32 [t*h*w, 3*14*14], CLIP-normalized patches in HF's order."""
    grid_thw: tuple[int, int, int]
    """(t, h, w) in ViT patches."""
    num_tokens: int
    """Placeholder tokens the LM sees: t*h*w / 4 for images, t*h*w / 8 for videos."""
    content_hash: str
    """sha256 of input bytes + options: the embedding cache key."""
    frame_timestamps: tuple[float, ...] = ()
    """Seconds of each of the t video frames (empty for images)."""


def num_media_tokens(kind: MediaKind, grid_thw: tuple[int, int, int]) -> int:
    """LM tokens after the resampler: 2x2 spatial merge, plus 2-frame temporal merge for video."""
    t, h, w = grid_thw
    merge = MERGE_SIZE * MERGE_SIZE * (TEMPORAL_MERGE if kind == "video" else 1)
    return (t * h * w) // merge


class MediaProcessor:
    """Preprocesses images and videos under one `MediaConfig`. Stateless and picklable,
    so it can run in a process pool."""

    def __init__(self, config: MediaConfig | None = None) -> None:
        self.config = config or MediaConfig()

    def image_hash(self, data: bytes) -> str:
        """Content hash of an image under this config (cheap: no decoding)."""
        return content_hash(data, "image", self.config.image.hash_fields())

    def video_hash(self, data: bytes, overrides: Mapping[str, Any] | None = None) -> str:
        """Content hash of a video under this config and per-request overrides (no decoding)."""
        options = self.config.video.with_overrides(overrides or {})
        return content_hash(data, "video", options.hash_fields())

    def image_tokens(self, height: int, width: int) -> int:
        """LM tokens of an image of this size, without its pixels."""
        image = self.config.image
        gh, gw = patch_grid(height, width, image.min_pixels, image.max_pixels)
        return num_media_tokens("image", (1, gh, gw))

    def process_image(self, data: bytes) -> ProcessedMedia:
        """Decode and preprocess one encoded image."""
        digest = self.image_hash(data)
        img = decode_image(data, self.config.limits)
        pixels, grid = preprocess_image(img, self.config.image)
        return ProcessedMedia("image", pixels, grid, num_media_tokens("image", grid), digest)

    def process_video(
        self, data: bytes, overrides: Mapping[str, Any] | None = None
    ) -> ProcessedMedia:
        """Decode, sample and preprocess one encoded video.

        `overrides` are FastDeploy's per-video request fields (fps, min_frames, max_frames,
        target_frames, frames_sample).
        """
        options = self.config.video.with_overrides(overrides or {})
        digest = content_hash(data, "video", options.hash_fields())
        video = sample_video(data, options)
        pixels, grid = preprocess_video(video)
        tokens = num_media_tokens("video", grid)
        return ProcessedMedia("video", pixels, grid, tokens, digest, video.timestamps)

    def process(
        self, kind: str, data: bytes, overrides: Mapping[str, Any] | None = None
    ) -> ProcessedMedia:
        """Dispatch on `kind` ("image" or "video")."""
        if kind == "image":
            if overrides:
                raise InvalidMediaOptionsError("images take no per-request overrides")
            return self.process_image(data)
        if kind == "video":
            return self.process_video(data, overrides)
        raise InvalidMediaOptionsError(f"kind must be 'image' or 'video', got {kind!r}")
