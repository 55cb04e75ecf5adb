"""Video: decode (mp4/webm/mkv), FastDeploy frame sampling, timestamps, caps, patch layout."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vision_svc.processing import (
    EmptyMediaError,
    MediaConfig,
    MediaDecodeError,
    MediaLimits,
    MediaProcessor,
    MediaTooLargeError,
    SampledVideo,
    VideoOptions,
    VideoTooLongError,
    preprocess_video,
    sample_video,
)
from vision_svc.processing.pixels import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vision_svc.processing.timestamps import format_timestamp, render_timestamp

av = pytest.importorskip("av")
decord = pytest.importorskip("decord")

# Small resize bounds keep these tests fast; sampling does not depend on them.
SMALL = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 4}


def make_video(
    num_frames: int, fps: int, fmt: str = "mp4", codec: str = "libx264", w: int = 64, h: int = 48
) -> bytes:
    """Encode frames whose grey level encodes the frame index (i * 6)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(num_frames):
            arr = np.full((h, w, 3), (i * 6) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def clip_40() -> bytes:
    """40 frames at 10 fps: 4 seconds."""
    return make_video(40, 10)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # default fps 2 -> int(4 * 2) = 8 < min_frames 16 -> 16 uniform frames
        ({}, [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27, 30, 32, 35, 37]),
        # min_frames 4: 8 frames on a 0.5 s grid
        ({"min_frames": 4}, [0, 5, 10, 15, 20, 25, 30, 35]),
        ({"min_frames": 0, "fps": 1}, [0, 10, 20, 30]),
        # 8 > max_frames 6 -> 6 uniform frames
        ({"min_frames": 4, "max_frames": 6}, [0, 6, 13, 20, 26, 33]),
        # 5 is odd -> the last frame is repeated
        ({"min_frames": 4, "max_frames": 5}, [0, 8, 16, 24, 32, 32]),
        ({"target_frames": 10, "min_frames": 4}, [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]),
        ({"target_frames": 4, "min_frames": 0, "frames_sample": "middle"}, [4, 14, 24, 34]),
        ({"min_frames": 0, "fps": 1, "frames_sample": "middle"}, [5, 15, 25, 35]),
    ],
)
def test_sampled_frames(clip_40: bytes, options: dict, expected: list[int]) -> None:
    video = sample_video(clip_40, VideoOptions(**SMALL, **options))
    assert list(video.indices) == expected
    assert video.frames.shape == (len(expected), 56, 56, 3)
    assert video.timestamps == pytest.approx([i / 10 for i in expected])
    # The decoded content is the frame we asked for: grey level i * 6 (away from the stamp).
    levels = video.frames[:, -5, -5, 0].astype(int)
    assert np.abs(levels - np.array(expected) * 6).max() <= 4


def test_short_video_gives_all_frames() -> None:
    video = sample_video(make_video(10, 10), VideoOptions(**SMALL))
    assert list(video.indices) == list(range(10))


@pytest.mark.parametrize(("kwargs", "count"), [({}, 40), ({"video_max_frames": 30}, 30)])
def test_mm_processor_kwargs_max_frames(kwargs: dict, count: int) -> None:
    data = make_video(60, 3, w=32, h=32)  # 20 s -> 40 frames at 2 fps
    config = MediaConfig.from_mm_processor_kwargs(
        {**kwargs, "video_min_pixels": SMALL["min_pixels"], "video_max_pixels": SMALL["max_pixels"]}
    )
    result = MediaProcessor(config).process_video(data)
    assert result.grid_thw == (count, 4, 4)
    assert len(result.frame_timestamps) == count
    assert result.num_tokens == count * 4 * 4 // 8


@pytest.mark.parametrize(
    ("fmt", "codec"), [("mp4", "libx264"), ("webm", "libvpx-vp9"), ("matroska", "libx264")]
)
def test_containers(fmt: str, codec: str) -> None:
    data = make_video(20, 10, fmt=fmt, codec=codec)
    video = sample_video(data, VideoOptions(**SMALL, min_frames=4))
    assert list(video.indices) == [0, 5, 10, 15]


def test_default_resize_bounds() -> None:
    result = MediaProcessor().process_video(make_video(8, 4))
    t, gh, gw = result.grid_thw
    assert t == 8 and (gh * 14) * (gw * 14) >= 299 * 28 * 28  # upscaled to the video minimum
    assert result.pixel_values.shape == (t * gh * gw, 588)


def test_timestamps_are_drawn() -> None:
    assert format_timestamp(0) == "time: 00:00:00.00"
    assert format_timestamp(3725.5) == "time: 01:02:05.50"
    frame = Image.new("RGB", (200, 100), (128, 128, 128))
    render_timestamp(frame, 1.5)
    arr = np.asarray(frame)
    corner = arr[:12, :100]
    assert corner.min() < 40 and corner.max() > 215  # black text, white outline
    assert (arr[50:, 100:] == 128).all()  # nothing drawn elsewhere
    data = make_video(20, 10, w=112, h=112)
    stamped = sample_video(data, VideoOptions(**SMALL, min_frames=4))
    plain = sample_video(data, VideoOptions(**SMALL, min_frames=4, draw_timestamps=False))
    assert not np.array_equal(stamped.frames[:, :8], plain.frames[:, :8])
    assert np.array_equal(stamped.frames[:, 40:], plain.frames[:, 40:])


def hf_reference_layout(frames: np.ndarray) -> np.ndarray:
    """HF Ernie4_5_VLMoeVideoProcessor._preprocess's view/permute, on torch (its own ops).

    HF's video processor imports torchvision, which is not installed, so we run its patching
    code path here verbatim on already-resized uint8 frames [T, H, W, 3].
    """
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).double() / 255.0
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    patches = ((x - mean) / std)[None]  # [batch=1, T, C, H, W]
    b, t, c, h, w = patches.shape
    p, m = 14, 2
    gh, gw = h // p, w // p
    patches = patches.view(b, t, c, gh // m, m, p, gw // m, m, p)
    patches = patches.permute(0, 1, 3, 6, 4, 7, 2, 5, 8)
    return patches.reshape(b, t * gh * gw, c * p * p)[0].float().numpy()


def test_patch_layout_matches_hf_video_processor() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 84, 112, 3), dtype=np.uint8)
    pixels, grid = preprocess_video(SampledVideo(frames, (0, 1, 2, 3), (0.0, 0.1, 0.2, 0.3)))
    assert grid == (4, 6, 8)
    np.testing.assert_allclose(pixels, hf_reference_layout(frames), atol=1e-5, rtol=0)


def test_empty_corrupt_truncated() -> None:
    with pytest.raises(EmptyMediaError):
        sample_video(b"")
    with pytest.raises(MediaDecodeError):
        sample_video(b"definitely not a video" * 20)
    data = make_video(20, 10)
    with pytest.raises(MediaDecodeError):
        sample_video(data[: len(data) // 2])


def test_caps() -> None:
    data = make_video(40, 10)  # 4 s, 64x48
    with pytest.raises(VideoTooLongError, match="lasts"):
        sample_video(data, VideoOptions(limits=MediaLimits(max_video_duration_s=3.5)))
    with pytest.raises(VideoTooLongError, match="frames"):
        sample_video(data, VideoOptions(limits=MediaLimits(max_video_source_frames=39)))
    with pytest.raises(MediaTooLargeError, match="pixels"):
        sample_video(data, VideoOptions(limits=MediaLimits(max_video_frame_pixels=64 * 47)))
    with pytest.raises(MediaTooLargeError, match="bytes"):
        sample_video(data, VideoOptions(limits=MediaLimits(max_video_bytes=len(data) - 1)))
