"""The service's model: the vision tower + resampler alone, loaded through the shared loader
without reading one language-model tensor."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import engine.models.loader as loader
from engine.models import load_model
from engine.models.vision_only import VISION_PREFIXES, Ernie45VisionEncoder, load_vision_model
from engine.tiny import ensure_tiny_model


def test_reads_only_vision_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    original = loader.read_tensors

    def recording(files: list[Path], keep=None) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in original(files, keep):
            read.append(name)
            yield name, tensor

    monkeypatch.setattr(loader, "read_tensors", recording)
    model, cfg = load_vision_model(ensure_tiny_model())
    vision = ("vision_model.", "resampler_model.", "model.vision_model.", "model.resampler_model.")
    assert read and all(n.startswith(vision) for n in read), read
    assert not [n for n in read if "layers." in n or "embed_tokens" in n]
    assert isinstance(model, Ernie45VisionEncoder) and model.hidden_size == cfg.text.hidden_size
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.startswith(VISION_PREFIXES) for n in names)


def test_weights_equal_the_full_models() -> None:
    path = ensure_tiny_model()
    vision, _ = load_vision_model(path, torch.bfloat16)
    full, _ = load_model(path, torch.bfloat16)
    full_params = dict(full.named_parameters())
    for name, p in vision.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, full_params[name]), name
    assert vision.vision_tower.rotary.inv_freq.dtype == torch.float32  # tables stay fp32
    pixels, grid = torch.randn(2 * 8 * 8, 588), (2, 8, 8)  # a 2-frame video
    with torch.inference_mode():
        assert torch.equal(vision.encode_media(pixels, [grid]), full.encode_media(pixels, [grid]))
