"""Frame timestamps drawn onto video frames, as ERNIE-4.5-VL saw them in training.

FastDeploy (`utils/render_timestamp.py`) and HF's video processor both draw
"time: HH:MM:SS.ss" at (0, 0) in black with a white outline; font size is
int(0.1 * min(width, height)) and the outline int(0.1 * font size), on the frame at its
original resolution (before resizing). They use Roboto-Regular.ttf, which ships with the model
but not with Pillow: pass its path as `font_path` for pixel parity. Without it we use Pillow's
bundled scalable default font (`ImageFont.load_default(size)`), which gives the same text at
the same place and size in a different typeface.
"""

from __future__ import annotations

import functools
import hashlib

import PIL
from PIL import Image, ImageDraw, ImageFont

from vision_svc.processing.errors import InvalidMediaOptionsError

FONT_RATE = 0.1
"""Font size as a fraction of min(width, height)."""
OUTLINE_RATE = 0.1
"""Outline width as a fraction of the font size."""


def format_timestamp(seconds: float) -> str:
    """Format seconds as ERNIE's "time: HH:MM:SS.ss" label."""
    hours, rest = divmod(seconds, 3600)
    mins, secs = divmod(rest, 60)
    return f"time: {int(hours):02d}:{int(mins):02d}:{secs:05.02f}"


@functools.lru_cache(maxsize=64)
def _load_font(font_path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Cached: loading a TrueType face per frame costs more than drawing on it.
    if font_path is None:
        return ImageFont.load_default(size=size)
    try:
        return ImageFont.truetype(font_path, size)
    except OSError as e:
        raise InvalidMediaOptionsError(f"cannot load timestamp font {font_path!r}: {e}") from e


@functools.lru_cache(maxsize=16)
def font_identity(font_path: str | None) -> str:
    """A stable id of the font for content hashes: the file's sha256, or Pillow's version."""
    if font_path is None:
        return f"pillow-default-{PIL.__version__}"
    try:
        with open(font_path, "rb") as f:
            return "sha256:" + hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise InvalidMediaOptionsError(f"cannot read timestamp font {font_path!r}: {e}") from e


def render_timestamp(frame: Image.Image, seconds: float, font_path: str | None = None) -> None:
    """Draw the timestamp label onto `frame` (RGB) in place."""
    font_size = int(min(frame.size) * FONT_RATE)
    if font_size < 1:
        return  # frames under 10 px: FastDeploy would fail on a 0-size font; draw nothing
    font = _load_font(font_path, font_size)
    ImageDraw.Draw(frame).text(
        (0, 0),
        format_timestamp(seconds),
        font=font,
        fill=(0, 0, 0),
        stroke_width=int(font_size * OUTLINE_RATE),
        stroke_fill=(255, 255, 255),
    )
