"""Errors raised for bad media and bad media options.

Every failure caused by user input is a `MediaError` (a `ValueError`), so the service's error
interceptor can map the whole family to INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for the size
caps) from one table. Each subclass carries a human-readable reason.
"""

from __future__ import annotations


class MediaError(ValueError):
    """Base class: the media or its options cannot be processed."""


class EmptyMediaError(MediaError):
    """The payload has no bytes."""


class UnsupportedFormatError(MediaError):
    """The bytes are not in a container/format we accept."""


class MediaDecodeError(MediaError):
    """The bytes claim a supported format but are corrupt or truncated."""


class MediaTooLargeError(MediaError):
    """A size cap (bytes, pixels, decompression bomb) was exceeded before decoding."""


class AspectRatioError(MediaError):
    """The aspect ratio is beyond what smart_resize accepts (200:1)."""


class VideoTooLongError(MediaError):
    """A video exceeds the duration or source-frame cap."""


class InvalidMediaOptionsError(MediaError):
    """Processor options (`--mm-processor-kwargs` or per-request overrides) are invalid."""
