"""Typed, validated options for media preprocessing.

`MediaConfig.from_mm_processor_kwargs` reads FastDeploy's `--mm-processor-kwargs` JSON object
(e.g. `{"video_max_frames": 30}`); `VideoOptions.with_overrides` applies FastDeploy's per-video
request fields (`fps`, `min_frames`, `max_frames`, `target_frames`, `frames_sample`).
Defaults are FastDeploy's `DataProcessor` defaults, which equal HF's processor configs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vision_svc.processing.errors import InvalidMediaOptionsError
from vision_svc.processing.resize import (
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
)

FRAMES_SAMPLE_MODES = ("leading", "middle")
"""FastDeploy also has "rand"; we refuse it so results (and content hashes) are reproducible."""


def _require(ok: bool, reason: str) -> None:
    if not ok:
        raise InvalidMediaOptionsError(reason)


def _check_pixels(min_pixels: int, max_pixels: int) -> None:
    _require(
        0 < min_pixels <= max_pixels,
        f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels} max_pixels={max_pixels}",
    )


@dataclass(frozen=True)
class MediaLimits:
    """Hard caps that protect the process from hostile or oversized inputs."""

    max_image_bytes: int = 64 * 1024 * 1024
    """Largest encoded image accepted."""
    max_image_pixels: int = 8192 * 8192
    """Largest decoded image area, checked from the header before any pixel is decoded."""
    max_video_bytes: int = 512 * 1024 * 1024
    """Largest encoded video accepted."""
    max_video_duration_s: float = 3600.0
    """Longest video accepted (frame count / average fps)."""
    max_video_source_frames: int = 3600 * 120
    """Most frames a video container may declare."""
    max_video_frame_pixels: int = 7680 * 4320
    """Largest frame area (8K UHD)."""
    max_sampled_frames: int = 1024
    """Upper bound on `max_frames` / `target_frames` whatever the options say."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _require(getattr(self, f.name) > 0, f"MediaLimits.{f.name} must be positive")


@dataclass(frozen=True)
class ImageOptions:
    """Options that change an image's pixel_values (all part of its content hash)."""

    min_pixels: int = IMAGE_MIN_PIXELS
    """Smallest resized area (pixels)."""
    max_pixels: int = IMAGE_MAX_PIXELS
    """Largest resized area (pixels)."""

    def __post_init__(self) -> None:
        _check_pixels(self.min_pixels, self.max_pixels)

    def hash_fields(self) -> dict[str, Any]:
        """The fields that enter the content hash."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class VideoOptions:
    """Options that change a video's frames and pixel_values (all part of its content hash).

    Priority as in FastDeploy: `target_frames` > (`min_frames`, `max_frames`) > `fps`.
    A value <= 0 disables `target_frames`, `min_frames` or `max_frames`.
    """

    min_pixels: int = VIDEO_MIN_PIXELS
    """Smallest resized frame area (pixels)."""
    max_pixels: int = VIDEO_MAX_PIXELS
    """Largest resized frame area (pixels)."""
    fps: float = 2.0
    """Frames sampled per second of video (before min/max clamping)."""
    min_frames: int = 16
    """Sample at least this many frames (fewer only if the video has fewer)."""
    max_frames: int = 180
    """Sample at most this many frames."""
    target_frames: int = -1
    """Sample exactly this many frames (uniform intervals) when > 0; fps is then ignored."""
    frames_sample: str = "leading"
    """Which frame of each interval: "leading" (first) or "middle"."""
    draw_timestamps: bool = True
    """Render "time: HH:MM:SS.ss" on each frame's top-left corner, as ERNIE was trained."""
    font_path: str | None = None
    """TrueType font for timestamps (ERNIE ships Roboto-Regular.ttf); None: Pillow's default."""
    limits: MediaLimits = field(default_factory=MediaLimits, compare=False, repr=False)
    """Caps used to validate frame counts (not part of the hash)."""

    def __post_init__(self) -> None:
        # 2 and 2.0 must hash alike: JSON kwargs may give either.
        object.__setattr__(self, "fps", float(self.fps))
        _check_pixels(self.min_pixels, self.max_pixels)
        _require(
            self.frames_sample in FRAMES_SAMPLE_MODES,
            f"frames_sample must be one of {FRAMES_SAMPLE_MODES}, got {self.frames_sample!r}",
        )
        cap = self.limits.max_sampled_frames
        _require(self.max_frames <= cap, f"max_frames {self.max_frames} exceeds the cap {cap}")
        _require(self.target_frames <= cap, f"target_frames {self.target_frames} exceeds {cap}")
        if self.min_frames > 0 and self.max_frames > 0:
            _require(
                self.min_frames <= self.max_frames,
                f"min_frames ({self.min_frames}) must not exceed max_frames ({self.max_frames})",
            )
        if self.target_frames > 0:
            _require(
                self.min_frames <= 0 or self.target_frames >= self.min_frames,
                f"target_frames ({self.target_frames}) below min_frames ({self.min_frames})",
            )
            _require(
                self.max_frames <= 0 or self.target_frames <= self.max_frames,
                f"target_frames ({self.target_frames}) above max_frames ({self.max_frames})",
            )
        else:
            _require(
                math.isfinite(self.fps) and self.fps > 0,
                f"fps must be a positive number when target_frames is unset, got {self.fps}",
            )

    def with_overrides(self, item: Mapping[str, Any]) -> VideoOptions:
        """Apply FastDeploy's per-video request fields; unknown keys are ignored (e.g. "video")."""
        changes = {k: item[k] for k in _REQUEST_KEYS if k in item}
        return _replace_checked(self, changes)

    def hash_fields(self) -> dict[str, Any]:
        """The fields that enter the content hash (the font by identity, limits excluded)."""
        from vision_svc.processing.timestamps import font_identity

        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}
        out["font_path"] = font_identity(self.font_path) if self.draw_timestamps else None
        return out


_REQUEST_KEYS = ("fps", "min_frames", "max_frames", "target_frames", "frames_sample")

# --mm-processor-kwargs key -> (which options, field name)
_KWARG_FIELDS: dict[str, tuple[str, str]] = {
    "image_min_pixels": ("image", "min_pixels"),
    "image_max_pixels": ("image", "max_pixels"),
    "video_min_pixels": ("video", "min_pixels"),
    "video_max_pixels": ("video", "max_pixels"),
    "video_fps": ("video", "fps"),
    "video_min_frames": ("video", "min_frames"),
    "video_max_frames": ("video", "max_frames"),
    "video_target_frames": ("video", "target_frames"),
    "video_frames_sample": ("video", "frames_sample"),
    "video_draw_timestamps": ("video", "draw_timestamps"),
    "video_font_path": ("video", "font_path"),
}

_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "min_pixels": (int,),
    "max_pixels": (int,),
    "fps": (int, float),
    "min_frames": (int,),
    "max_frames": (int,),
    "target_frames": (int,),
    "frames_sample": (str,),
    "draw_timestamps": (bool,),
    "font_path": (str, type(None)),
}


def _replace_checked(options: Any, changes: Mapping[str, Any]) -> Any:
    """dataclasses.replace with type checks, so JSON strings like "30" fail clearly."""
    for name, value in changes.items():
        types = _FIELD_TYPES[name]
        # bool is an int subclass; refuse True as a frame count.
        bad_bool = isinstance(value, bool) and bool not in types
        _require(
            isinstance(value, types) and not bad_bool,
            f"{name} must be {' or '.join(t.__name__ for t in types)}, got {value!r}",
        )
    return dataclasses.replace(options, **changes)


@dataclass(frozen=True)
class MediaConfig:
    """Process-wide preprocessing configuration of the vision service."""

    image: ImageOptions = field(default_factory=ImageOptions)
    video: VideoOptions = field(default_factory=VideoOptions)
    limits: MediaLimits = field(default_factory=MediaLimits)

    def __post_init__(self) -> None:
        if self.video.limits != self.limits:
            object.__setattr__(self, "video", dataclasses.replace(self.video, limits=self.limits))

    @classmethod
    def from_mm_processor_kwargs(
        cls, kwargs: Mapping[str, Any] | None, limits: MediaLimits | None = None
    ) -> MediaConfig:
        """Build from FastDeploy's `--mm-processor-kwargs` object; unknown keys are refused."""
        kwargs = kwargs or {}
        _require(isinstance(kwargs, Mapping), f"mm-processor-kwargs must be an object: {kwargs!r}")
        unknown = sorted(set(kwargs) - set(_KWARG_FIELDS))
        known = sorted(_KWARG_FIELDS)
        _require(not unknown, f"unknown mm-processor-kwargs {unknown}; known: {known}")
        limits = limits or MediaLimits()
        changes: dict[str, dict[str, Any]] = {"image": {}, "video": {}}
        for key, value in kwargs.items():
            kind, name = _KWARG_FIELDS[key]
            changes[kind][name] = value
        image = _replace_checked(ImageOptions(), changes["image"])
        video = _replace_checked(VideoOptions(limits=limits), changes["video"])
        return cls(image=image, video=video, limits=limits)
