"""Tandem's ERNIE models against transformers (the independent reference): same random
checkpoint, same inputs -> fp32 logits within 1e-4; the Paddle layout loads identically."""

from __future__ import annotations

import pytest
import torch

from engine.models import load_model
from tests.engine.hf_models import (
    VL_VARIANTS,
    build_prompt,
    hf_logits,
    make_text,
    make_vl,
    write_hf_native_layout,
    write_paddle_layout,
)
from tests.engine.tandem_forward import tandem_logits

ATOL = 1e-4

PROMPTS = {
    "text": [],
    "one_image": [("image", (1, 4, 6))],
    "two_images": [("image", (1, 4, 4)), ("image", (1, 6, 8))],
    "one_video": [("video", (4, 4, 4))],
    "mixed": [("image", (1, 6, 4)), ("video", (2, 4, 6)), ("image", (1, 2, 2))],
}


@pytest.fixture(scope="module", params=sorted(VL_VARIANTS))
def vl_checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"vl_{request.param}")
    hf = make_vl(path / "hf", request.param, seed=len(request.param))
    write_paddle_layout(path / "hf", path / "paddle")
    return hf, path


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_vl_logits_match_transformers(vl_checkpoint, prompt):
    hf, path = vl_checkpoint
    p = build_prompt(PROMPTS[prompt], seed=3)
    expected = hf_logits(hf, p)
    model, cfg = load_model(path / "hf")
    got = tandem_logits(model, cfg, p)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_vl_paddle_layout_loads_identically(vl_checkpoint):
    _, path = vl_checkpoint
    p = build_prompt(PROMPTS["mixed"], seed=5)
    hf_model, hf_cfg = load_model(path / "hf")
    pd_model, pd_cfg = load_model(path / "paddle")
    assert pd_cfg.text == hf_cfg.text
    assert pd_cfg.vision == hf_cfg.vision
    torch.testing.assert_close(
        tandem_logits(pd_model, pd_cfg, p), tandem_logits(hf_model, hf_cfg, p), atol=0, rtol=0
    )


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_text_models_match_transformers(tmp_path, moe):
    hf = make_text(tmp_path / "hf", moe=moe, seed=7)
    p = build_prompt([], seed=11)
    p.ids = p.ids * 4  # a longer text prompt spanning several KV blocks
    expected = hf_logits(hf, p)
    model, cfg = load_model(tmp_path / "hf")
    torch.testing.assert_close(tandem_logits(model, cfg, p), expected, atol=ATOL, rtol=0)
    write_paddle_layout(tmp_path / "hf", tmp_path / "paddle")
    pd_model, pd_cfg = load_model(tmp_path / "paddle")
    torch.testing.assert_close(tandem_logits(pd_model, pd_cfg, p), expected, atol=ATOL, rtol=0)


def test_vl_hf_native_layout_loads_identically(vl_checkpoint, tmp_path):
    hf, path = vl_checkpoint
    write_hf_native_layout(hf, path / "hf", tmp_path / "native")
    p = build_prompt(PROMPTS["one_image"], seed=9)
    model, cfg = load_model(tmp_path / "native")
    torch.testing.assert_close(tandem_logits(model, cfg, p), hf_logits(hf, p), atol=ATOL, rtol=0)
