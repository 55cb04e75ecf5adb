"""Image decode (bytes -> upright RGB) and preprocessing (RGB -> ViT patches).

Decode order matters for safety: the header is parsed first and the pixel cap checked before
any pixel is decoded, so a decompression bomb costs a few bytes of parsing, not gigabytes.
Colour handling follows HF's `convert_to_rgb` (which the ERNIE processors use): anything with
an alpha channel or a transparent palette entry is composited onto white; CMYK, palette, grey
and 1-bit images convert with Pillow's `convert("RGB")`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vision_svc.processing.config import ImageOptions, MediaLimits
from vision_svc.processing.errors import (
    EmptyMediaError,
    MediaDecodeError,
    MediaError,
    MediaTooLargeError,
    UnsupportedFormatError,
)
from vision_svc.processing.pixels import normalize, patchify
from vision_svc.processing.resize import FACTOR, smart_resize

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
"""Pillow plugins we let parse untrusted bytes (JPEG includes MPO, as many phones write)."""


def _open_header(data: bytes, limits: MediaLimits) -> Image.Image:
    """Parse only the header; refuse empty, oversized, unknown or bomb-sized images."""
    if not data:
        raise EmptyMediaError("image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise MediaTooLargeError(
            f"image is {len(data)} bytes, more than the {limits.max_image_bytes} allowed"
        )
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise MediaTooLargeError(f"image refused as a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise UnsupportedFormatError(
            f"not a supported image ({', '.join(ALLOWED_FORMATS)}) or a corrupt header"
        ) from e
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises many types on hostile headers
        raise MediaDecodeError(f"corrupt image header: {e}") from e
    width, height = img.size
    if width <= 0 or height <= 0:
        raise MediaDecodeError(f"image has an empty size {width}x{height}")
    if width * height > limits.max_image_pixels:
        # Checked before load(): our cap sits below Pillow's MAX_IMAGE_PIXELS warning level,
        # so Pillow's global bomb check (which we leave untouched) is only a second fence.
        raise MediaTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, more than the "
            f"{limits.max_image_pixels} allowed (possible decompression bomb)"
        )
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparency is composited onto white (as HF does)."""
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes, limits: MediaLimits | None = None) -> Image.Image:
    """Decode JPEG/PNG/WebP/GIF (first frame)/BMP bytes to an upright RGB image.

    Raises a `MediaError` subclass for empty, unsupported, oversized, corrupt or truncated
    input. EXIF orientation is applied, so a rotated phone photo comes out upright.
    """
    img = _open_header(data, limits or MediaLimits())
    try:
        img.load()  # decodes frame 0 only for animated GIF/WebP
        upright = ImageOps.exif_transpose(img)
        return to_rgb(upright)
    except MediaError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # truncated data raises OSError; broken EXIF/palettes other types
        raise MediaDecodeError(f"corrupt or truncated {img.format} image: {e}") from e


def preprocess_image(
    img: Image.Image, options: ImageOptions | None = None
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RGB image -> (pixel_values [gh*gw, 3*14*14] float32, grid (1, gh, gw)).

    Same result as HF `Ernie4_5_VLMoeImageProcessorPil`: smart_resize, PIL bicubic resize,
    rescale 1/255, CLIP mean/std, 2x2-merge-ordered patches.
    """
    options = options or ImageOptions()
    if img.mode != "RGB":
        img = to_rgb(img)
    h, w = smart_resize(img.height, img.width, FACTOR, options.min_pixels, options.max_pixels)
    resized = img.resize((w, h), Image.Resampling.BICUBIC)
    frames = np.asarray(resized, dtype=np.uint8)[None]  # [1, H, W, 3]
    return patchify(normalize(frames))
