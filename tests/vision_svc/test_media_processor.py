"""MediaProcessor, --mm-processor-kwargs parsing and content hashes."""

from __future__ import annotations

import io
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from PIL import Image

from vision_svc.processing import (
    InvalidMediaOptionsError,
    MediaConfig,
    MediaError,
    MediaProcessor,
    ProcessedMedia,
    UnsupportedFormatError,
    VideoOptions,
    content_hash,
)


def png(w: int, h: int, colour: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_process_image_result() -> None:
    result = MediaProcessor().process_image(png(640, 480))
    assert isinstance(result, ProcessedMedia)
    assert result.kind == "image" and result.grid_thw == (1, 34, 46)
    assert result.pixel_values.shape == (34 * 46, 588) and result.pixel_values.dtype == np.float32
    assert result.num_tokens == 34 * 46 // 4 == MediaProcessor().image_tokens(480, 640)
    assert result.frame_timestamps == ()
    assert len(result.content_hash) == 64 and int(result.content_hash, 16) >= 0


def test_mm_processor_kwargs() -> None:
    config = MediaConfig.from_mm_processor_kwargs(
        {"video_max_frames": 30, "video_fps": 1, "image_max_pixels": 28 * 28 * 100}
    )
    assert config.video.max_frames == 30 and config.video.fps == 1.0
    assert config.image.max_pixels == 28 * 28 * 100
    assert MediaConfig.from_mm_processor_kwargs(None) == MediaConfig()


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"video_max_framez": 3}, "unknown"),
        ({"video_max_frames": "30"}, "must be int"),
        ({"video_max_frames": True}, "must be int"),
        ({"video_min_frames": 40, "video_max_frames": 30}, "must not exceed"),
        ({"video_max_frames": 100_000}, "cap"),
        ({"video_fps": 0}, "fps"),
        ({"video_frames_sample": "rand"}, "frames_sample"),
        ({"image_min_pixels": 10, "image_max_pixels": 5}, "min_pixels"),
        ({"video_target_frames": 8}, "below min_frames"),
    ],
)
def test_bad_mm_processor_kwargs(kwargs: dict, reason: str) -> None:
    with pytest.raises(InvalidMediaOptionsError, match=reason):
        MediaConfig.from_mm_processor_kwargs(kwargs)


def test_request_overrides() -> None:
    base = VideoOptions()
    changed = base.with_overrides({"video": "x", "fps": 4, "min_frames": 4, "max_frames": 8})
    assert (changed.fps, changed.min_frames, changed.max_frames) == (4.0, 4, 8)
    # As in FastDeploy, max_frames below the (default) min_frames is an error...
    with pytest.raises(InvalidMediaOptionsError, match="must not exceed"):
        base.with_overrides({"max_frames": 8})
    # ...and a value <= 0 disables the bound.
    assert base.with_overrides({"max_frames": -1}).max_frames == -1
    with pytest.raises(InvalidMediaOptionsError, match="fps"):
        base.with_overrides({"fps": "2"})
    with pytest.raises(InvalidMediaOptionsError):
        MediaProcessor().process("image", png(8, 8), {"fps": 1})
    with pytest.raises(InvalidMediaOptionsError):
        MediaProcessor().process("audio", b"x")


def test_hash_changes_with_data_kind_and_options() -> None:
    data = png(32, 32)
    h = content_hash(data, "image", {"max_pixels": 10})
    assert h == content_hash(data, "image", {"max_pixels": 10})
    assert h != content_hash(png(32, 32, (0, 0, 0)), "image", {"max_pixels": 10})
    assert h != content_hash(data, "video", {"max_pixels": 10})
    assert h != content_hash(data, "image", {"max_pixels": 11})
    assert h == content_hash(bytearray(data), "image", {"max_pixels": 10})
    processor = MediaProcessor()
    small = MediaProcessor(MediaConfig.from_mm_processor_kwargs({"image_max_pixels": 28 * 28 * 8}))
    assert processor.image_hash(data) != small.image_hash(data)
    assert processor.video_hash(data) != processor.video_hash(data, {"max_frames": 30})
    # Options that give the same result hash alike (fps 2 == 2.0).
    assert processor.video_hash(data, {"fps": 2}) == processor.video_hash(data, {"fps": 2.0})


def test_hash_of_arrays_includes_dtype_and_shape() -> None:
    a = np.arange(12, dtype=np.uint8)
    assert content_hash(a, "image") != content_hash(a.reshape(3, 4), "image")
    assert content_hash(a, "image") != content_hash(a.view(np.int8), "image")
    assert content_hash(a[::2], "image") == content_hash(np.ascontiguousarray(a[::2]), "image")
    with pytest.raises(InvalidMediaOptionsError):
        content_hash("a string", "image")  # type: ignore[arg-type]
    with pytest.raises(InvalidMediaOptionsError):
        content_hash(b"x", "image", {"f": float("nan")})


def test_hash_is_stable_across_processes() -> None:
    code = (
        "from vision_svc.processing import content_hash;"
        "print(content_hash(b'abc', 'video', {'fps': 2.0, 'max_frames': 30}))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outs == {content_hash(b"abc", "video", {"max_frames": 30, "fps": 2.0})}


def test_runs_in_a_process_pool() -> None:
    processor = MediaProcessor()
    with ProcessPoolExecutor(max_workers=1) as pool:
        result = pool.submit(processor.process_image, png(100, 60)).result()
    assert result.grid_thw == processor.process_image(png(100, 60)).grid_thw
    with ProcessPoolExecutor(max_workers=1) as pool, pytest.raises(UnsupportedFormatError):
        pool.submit(processor.process_image, b"nope").result()


def test_all_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        MediaProcessor().process_image(b"")
    assert issubclass(MediaError, ValueError)
