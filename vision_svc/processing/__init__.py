"""Torch-free media preprocessing for ERNIE-4.5-VL (numpy + Pillow + decord).

Safe to import in the gateway and in worker processes; decord loads only when a video is
opened.
"""

from __future__ import annotations

from vision_svc.processing.config import ImageOptions, MediaConfig, MediaLimits, VideoOptions
from vision_svc.processing.errors import (
    AspectRatioError,
    EmptyMediaError,
    InvalidMediaOptionsError,
    MediaDecodeError,
    MediaError,
    MediaTooLargeError,
    UnsupportedFormatError,
    VideoTooLongError,
)
from vision_svc.processing.hashing import content_hash
from vision_svc.processing.image import decode_image, preprocess_image
from vision_svc.processing.processor import MediaProcessor, ProcessedMedia, num_media_tokens
from vision_svc.processing.resize import patch_grid, smart_resize
from vision_svc.processing.video import SampledVideo, preprocess_video, sample_video

__all__ = [
    "AspectRatioError",
    "EmptyMediaError",
    "ImageOptions",
    "InvalidMediaOptionsError",
    "MediaConfig",
    "MediaDecodeError",
    "MediaError",
    "MediaLimits",
    "MediaProcessor",
    "MediaTooLargeError",
    "ProcessedMedia",
    "SampledVideo",
    "UnsupportedFormatError",
    "VideoOptions",
    "VideoTooLongError",
    "content_hash",
    "decode_image",
    "num_media_tokens",
    "patch_grid",
    "preprocess_image",
    "preprocess_video",
    "sample_video",
    "smart_resize",
]
