"""Parity with HF transformers' ERNIE-4.5-VL PIL image processor (the correctness reference)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vision_svc.processing import ImageOptions, decode_image, preprocess_image, smart_resize

hf_module = pytest.importorskip(
    "transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe"
)


@pytest.fixture(scope="module")
def hf_processor() -> object:
    return hf_module.Ernie4_5_VLMoeImageProcessorPil()


def noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_defaults_match_hf(hf_processor: object) -> None:
    size = hf_processor.size  # type: ignore[attr-defined]
    assert size["shortest_edge"] == 56 * 56 and size["longest_edge"] == 28 * 28 * 6177


def test_smart_resize_matches_hf() -> None:
    for h in (1, 9, 27, 28, 41, 100, 517, 1080, 3001, 7000):
        for w in (1, 3, 56, 99, 640, 1920, 4096):
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in ((3136, 28 * 28 * 6177), (299 * 784, 1196 * 784), (3136, 3136 * 4)):
                assert smart_resize(h, w, 28, lo, hi) == hf_module.smart_resize(h, w, 28, lo, hi)


@pytest.mark.parametrize(
    "size",
    [(100, 100), (640, 480), (37, 500), (13, 7), (1100, 700), (5000, 28), (1, 150)],
)
def test_pixel_values_match_hf(hf_processor: object, size: tuple[int, int]) -> None:
    img = noise(*size, seed=sum(size))
    ref = hf_processor(images=[img], return_tensors="np")  # type: ignore[operator]
    pixels, grid = preprocess_image(img)
    assert [list(grid)] == ref["image_grid_thw"].tolist()
    assert pixels.dtype == np.float32 and pixels.shape == ref["pixel_values"].shape
    np.testing.assert_allclose(pixels, ref["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "LA"])
def test_modes_match_hf_conversion(hf_processor: object, mode: str) -> None:
    # Decode through our path; HF gets the same decoded (pre-RGB) Pillow image.
    src = noise(120, 90, seed=3)
    if mode in ("RGBA", "LA"):
        src.putalpha(Image.linear_gradient("L").resize((120, 90)))
    src = src.convert(mode)
    buf = io.BytesIO()
    src.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    data = buf.getvalue()
    ref = hf_processor(images=[Image.open(io.BytesIO(data))], return_tensors="np")  # type: ignore[operator]
    pixels, _ = preprocess_image(decode_image(data))
    np.testing.assert_allclose(pixels, ref["pixel_values"], atol=1e-5, rtol=0)


def test_custom_pixel_bounds_match_hf() -> None:
    hf = hf_module.Ernie4_5_VLMoeImageProcessorPil(
        size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16}
    )
    img = noise(800, 300, seed=9)
    ref = hf(images=[img], return_tensors="np")
    options = ImageOptions(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    pixels, grid = preprocess_image(img, options)
    assert [list(grid)] == ref["image_grid_thw"].tolist()
    np.testing.assert_allclose(pixels, ref["pixel_values"], atol=1e-5, rtol=0)
