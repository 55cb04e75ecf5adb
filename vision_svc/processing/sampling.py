"""Which frames of a video to keep, following FastDeploy's ERNIE-4.5-VL processor.

`frames_to_extract = int(duration * fps)`; if that is below `min_frames` we sample exactly
`min_frames`, above `max_frames` exactly `max_frames` (uniform intervals, one frame per
interval); otherwise we sample at `fps` on a time grid. Never more frames than the video has.
The caller pads an odd count to even by repeating the last frame (temporal merge is 2).
"""

from __future__ import annotations

import numpy as np

from vision_svc.processing.config import VideoOptions
from vision_svc.processing.errors import MediaDecodeError


def resolve_target_frames(duration_s: float, options: VideoOptions) -> int:
    """Return the exact frame count to sample uniformly, or -1 to sample at `options.fps`."""
    if options.target_frames > 0:
        # FastDeploy refuses target_frames unless fps < 0; we let target_frames win instead.
        return options.target_frames
    frames_at_fps = int(duration_s * options.fps)
    target = -1
    if options.min_frames > 0 and frames_at_fps < options.min_frames:
        target = options.min_frames
    if options.max_frames > 0 and frames_at_fps > options.max_frames:
        target = options.max_frames
    return target


def uniform_indices(num_frames: int, target: int, mode: str) -> list[int]:
    """One frame from each of `target` equal intervals of [0, num_frames)."""
    count = min(target, num_frames)
    bounds = np.linspace(0, num_frames, count + 1).astype(int)
    starts, ends = bounds[:-1], bounds[1:] - 1
    picked = starts if mode == "leading" else (starts + ends) // 2
    return [int(i) for i in picked]


def fps_indices(num_frames: int, source_fps: float, fps: float, mode: str) -> list[int]:
    """Frames nearest to a time grid of step 1/fps (from 0, or from half a step for "middle")."""
    duration = num_frames / source_fps
    step = 1.0 / fps
    offset = 0.0 if mode == "leading" else step / 2
    seconds = np.arange(offset, duration + offset, step)
    indices = np.around(seconds * source_fps).astype(int)
    return [int(i) for i in indices if i < num_frames]


def sample_indices(num_frames: int, source_fps: float, options: VideoOptions) -> list[int]:
    """Frame indices to decode for a video of `num_frames` frames at `source_fps`."""
    if num_frames <= 0 or not source_fps > 0:
        raise MediaDecodeError(f"video reports {num_frames} frames at {source_fps} fps")
    target = resolve_target_frames(num_frames / source_fps, options)
    if target > 0:
        indices = uniform_indices(num_frames, target, options.frames_sample)
    else:
        indices = fps_indices(num_frames, source_fps, options.fps, options.frames_sample)
    if not indices:
        raise MediaDecodeError("no frame could be sampled from the video")
    return indices


def frame_timestamps(indices: list[int], num_frames: int, source_fps: float) -> list[float]:
    """Seconds of each sampled frame, computed as FastDeploy does (index * duration / frames)."""
    duration = num_frames / float(source_fps)
    return [i * duration / num_frames for i in indices]
