"""Image decode: formats, modes, EXIF orientation, and every kind of bad input."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from vision_svc.processing import (
    AspectRatioError,
    EmptyMediaError,
    MediaDecodeError,
    MediaLimits,
    MediaTooLargeError,
    UnsupportedFormatError,
    decode_image,
    preprocess_image,
)


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
@pytest.mark.parametrize("size", [(1, 1), (17, 300), (640, 480), (300, 2)])
def test_formats_and_sizes_decode_to_rgb(fmt: str, size: tuple[int, int]) -> None:
    img = decode_image(encode(gradient(*size), fmt))
    assert img.mode == "RGB" and img.size == size


def test_lossless_png_round_trip_is_exact() -> None:
    src = gradient(33, 21)
    assert np.array_equal(np.asarray(decode_image(encode(src, "PNG"))), np.asarray(src))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "1", "CMYK", "I;16"])
def test_modes_convert_to_rgb(mode: str) -> None:
    src = gradient(40, 30).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    img = decode_image(encode(src, fmt))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_cmyk_jpeg_colours() -> None:
    red = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    pixel = np.asarray(decode_image(encode(red, "JPEG", quality=95)))[16, 16].astype(int)
    assert np.abs(pixel - [255, 0, 0]).max() <= 6


def test_grey_is_replicated() -> None:
    pixel = np.asarray(decode_image(encode(Image.new("L", (8, 8), 77), "PNG")))[0, 0]
    assert pixel.tolist() == [77, 77, 77]


def test_rgba_is_composited_on_white() -> None:
    src = Image.new("RGBA", (4, 1))
    src.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white
    src.putpixel((1, 0), (255, 0, 0, 255))  # opaque red stays red
    src.putpixel((2, 0), (0, 0, 255, 128))  # half blue over white
    arr = np.asarray(decode_image(encode(src, "PNG"))).astype(int)
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[0, 1].tolist() == [255, 0, 0]
    assert np.abs(arr[0, 2] - [127, 127, 255]).max() <= 1


def test_palette_transparency_is_composited_on_white() -> None:
    src = Image.new("P", (4, 4), 0)
    src.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    src.putpixel((1, 1), 1)
    data = encode(src, "GIF", transparency=0)
    arr = np.asarray(decode_image(data))
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[1, 1].tolist() == [255, 0, 0]


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    assert np.asarray(decode_image(buf.getvalue()))[8, 8].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    ("orientation", "top_colour"), [(1, None), (3, None), (6, "red"), (8, "blue")]
)
def test_exif_orientation_comes_out_upright(orientation: int, top_colour: str | None) -> None:
    # Stored sideways: 40 wide x 20 high, left half red, right half blue.
    src = Image.new("RGB", (40, 20), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = decode_image(encode(src, "JPEG", exif=exif.tobytes(), quality=95))
    arr = np.asarray(img).astype(int)
    if orientation in (6, 8):  # 90-degree rotations swap the sides
        assert img.size == (20, 40)
        colour = [255, 0, 0] if top_colour == "red" else [0, 0, 255]
        assert np.abs(arr[5, 10] - colour).max() < 40  # top
    else:
        assert img.size == (40, 20)
        left = [255, 0, 0] if orientation == 1 else [0, 0, 255]  # 3 = 180 degrees
        assert np.abs(arr[10, 5] - left).max() < 40


def test_empty_bytes() -> None:
    with pytest.raises(EmptyMediaError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize("data", [b"hello world, not an image", b"\x00" * 64])
def test_garbage_is_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedFormatError):
        decode_image(data)


def test_tiff_is_not_accepted() -> None:
    with pytest.raises(UnsupportedFormatError):
        decode_image(encode(gradient(8, 8), "TIFF"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated_files(fmt: str) -> None:
    data = encode(gradient(200, 150), fmt)
    with pytest.raises(MediaDecodeError, match=r"corrupt|truncated"):
        decode_image(data[: len(data) // 2])


def test_corrupt_png_body() -> None:
    data = bytearray(encode(gradient(64, 64), "PNG"))
    data[60:-20] = bytes(len(data) - 80)  # zero the compressed data, keep the header
    with pytest.raises(MediaDecodeError, match="corrupt"):
        decode_image(bytes(data))


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (1-bit grey), with a small IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [9000, 100_000])
def test_decompression_bomb_refused_before_decoding(side: int) -> None:
    # 9000^2 is over our 8192^2 cap but under Pillow's own limit; 100000^2 trips Pillow's.
    start = time.perf_counter()
    with pytest.raises(MediaTooLargeError):
        decode_image(_png_with_header_size(side, side))
    assert time.perf_counter() - start < 1.0  # nothing was decoded


def test_pixel_and_byte_caps_are_configurable() -> None:
    data = encode(gradient(200, 200), "PNG")
    with pytest.raises(MediaTooLargeError, match="pixels"):
        decode_image(data, MediaLimits(max_image_pixels=200 * 199))
    with pytest.raises(MediaTooLargeError, match="bytes"):
        decode_image(data, MediaLimits(max_image_bytes=len(data) - 1))
    assert decode_image(data, MediaLimits(max_image_pixels=200 * 200)).size == (200, 200)


def test_extreme_aspect_ratio_is_a_media_error() -> None:
    img = decode_image(encode(gradient(402, 2), "PNG"))
    with pytest.raises(AspectRatioError):
        preprocess_image(img)


def test_preprocess_shapes() -> None:
    pixels, grid = preprocess_image(gradient(640, 480))
    assert grid == (1, 34, 46)  # 476 x 644 after smart_resize
    assert pixels.shape == (34 * 46, 588) and pixels.dtype == np.float32
