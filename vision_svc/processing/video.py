"""Video decode (decord), frame sampling, timestamp rendering and patching.

Pipeline, as FastDeploy's ERNIE-4.5-VL processor does it: read frame count and average fps,
pick frame indices (`sampling.py`), decode them, draw each frame's timestamp at the frame's
original resolution, resize with PIL bicubic to one smart_resize size for the whole video,
repeat the last frame if the count is odd (the resampler merges frames in pairs), then
normalize and patch like an image, frame after frame.

Frames are decoded in small chunks and resized at once, so memory holds one chunk at source
resolution, not every sampled frame (FastDeploy keeps them all).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vision_svc.processing.config import MediaLimits, VideoOptions
from vision_svc.processing.errors import (
    EmptyMediaError,
    MediaDecodeError,
    MediaTooLargeError,
    VideoTooLongError,
)
from vision_svc.processing.pixels import normalize, patchify
from vision_svc.processing.resize import FACTOR, smart_resize
from vision_svc.processing.sampling import frame_timestamps, sample_indices
from vision_svc.processing.timestamps import render_timestamp

DECODE_CHUNK = 8
"""Frames decoded per decord call: bounds peak memory at source resolution."""


@dataclass(frozen=True)
class VideoSource:
    """An opened video: decord reader plus what the container says about it."""

    reader: Any  # decord.VideoReader (decord has no type stubs)
    num_frames: int
    fps: float

    @property
    def duration_s(self) -> float:
        """Length in seconds, as FastDeploy computes it (frames / average fps)."""
        return self.num_frames / self.fps


@dataclass(frozen=True)
class SampledVideo:
    """Sampled, timestamped and resized frames of one video, padded to an even count."""

    frames: np.ndarray
    """uint8 [T, H, W, 3], T even, H and W multiples of 28."""
    indices: tuple[int, ...]
    """Source frame index of each of the T frames (the last one repeated if padded)."""
    timestamps: tuple[float, ...]
    """Seconds of each of the T frames."""


def open_video(data: bytes, limits: MediaLimits | None = None) -> VideoSource:
    """Open mp4/webm/mkv/... bytes with decord; check byte, frame-count and duration caps."""
    import decord  # lazy: image-only users (the gateway) need not load ffmpeg

    limits = limits or MediaLimits()
    if not data:
        raise EmptyMediaError("video is empty (0 bytes)")
    if len(data) > limits.max_video_bytes:
        raise MediaTooLargeError(f"video is {len(data)} bytes, over {limits.max_video_bytes}")
    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        num_frames, fps = len(reader), float(reader.get_avg_fps())
    except MemoryError:
        raise
    except Exception as e:  # decord raises RuntimeError/AssertionError/DECORDError
        raise MediaDecodeError(f"not a decodable video or corrupt/truncated: {e}") from e
    if num_frames <= 0 or not math.isfinite(fps) or fps <= 0:
        raise MediaDecodeError(f"video reports {num_frames} frames at {fps} fps")
    source = VideoSource(reader, num_frames, fps)
    if num_frames > limits.max_video_source_frames:
        raise VideoTooLongError(
            f"video has {num_frames} frames, over {limits.max_video_source_frames}"
        )
    if source.duration_s > limits.max_video_duration_s:
        raise VideoTooLongError(
            f"video lasts {source.duration_s:.1f} s, over {limits.max_video_duration_s:.0f} s"
        )
    return source


def _decode_chunk(source: VideoSource, indices: list[int], limits: MediaLimits) -> np.ndarray:
    """Decode frames [n, H, W, 3] uint8; refuse frames above the pixel cap."""
    try:
        batch = source.reader.get_batch(indices).asnumpy()
    except MemoryError:
        raise
    except Exception as e:
        raise MediaDecodeError(f"cannot decode video frames {indices}: {e}") from e
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise MediaDecodeError(f"unexpected decoded frame shape {batch.shape}")
    height, width = batch.shape[1:3]
    if height * width > limits.max_video_frame_pixels:
        raise MediaTooLargeError(
            f"video frames are {width}x{height}, over {limits.max_video_frame_pixels} pixels"
        )
    return batch


def sample_video(data: bytes, options: VideoOptions | None = None) -> SampledVideo:
    """Decode, sample, timestamp and resize the frames of one video."""
    options = options or VideoOptions()
    source = open_video(data, options.limits)
    indices = sample_indices(source.num_frames, source.fps, options)
    stamps = frame_timestamps(indices, source.num_frames, source.fps)
    out: list[np.ndarray] = []
    size: tuple[int, int] | None = None  # (w, h) after smart_resize, fixed by frame 0
    for start in range(0, len(indices), DECODE_CHUNK):
        chunk = _decode_chunk(source, indices[start : start + DECODE_CHUNK], options.limits)
        if size is None:
            h, w = smart_resize(
                chunk.shape[1], chunk.shape[2], FACTOR, options.min_pixels, options.max_pixels
            )
            size = (w, h)
        for frame, seconds in zip(chunk, stamps[start : start + DECODE_CHUNK], strict=True):
            img = Image.fromarray(frame, "RGB")
            if options.draw_timestamps:
                render_timestamp(img, seconds, options.font_path)
            out.append(np.asarray(img.resize(size, Image.Resampling.BICUBIC)))
    if len(out) % 2:
        # Temporal merge 2: repeat the last (already stamped) frame, as FastDeploy and HF do.
        out.append(out[-1])
        indices, stamps = [*indices, indices[-1]], [*stamps, stamps[-1]]
    return SampledVideo(np.stack(out), tuple(indices), tuple(stamps))


def preprocess_video(video: SampledVideo) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Sampled frames -> (pixel_values_videos [T*gh*gw, 3*14*14] float32, grid (T, gh, gw)).

    Layout as HF's `Ernie4_5_VLMoeVideoProcessor`: one 588-wide row per 14x14 patch, frames in
    order, each frame in the image's 2x2-merge order. The language model sees
    T*gh*gw / (2*2*2) tokens after the resampler's spatial and temporal merges.
    """
    return patchify(normalize(video.frames))
