"""The `dummy` load format: real shapes, random weights, allocated in the target dtype."""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.models import build_random_model
from engine.models.ernie45_vl import Ernie45VLForConditionalGeneration
from engine.tiny import ensure_tiny_model
from tests.engine.hf_models import build_prompt
from tests.engine.tandem_forward import tandem_logits


def test_random_model_dtypes_and_forward():
    cfg = ModelConfig.from_dir(ensure_tiny_model())
    model = build_random_model(cfg, torch.bfloat16, seed=3)
    assert isinstance(model, Ernie45VLForConditionalGeneration)
    routers = [n for n, p in model.named_parameters() if p.dtype == torch.float32]
    assert routers and all(".gate." in n for n in routers)  # only the routers stay fp32
    assert model.language_model.model.rotary.inv_freq.dtype == torch.float32
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()  # tied
    again = build_random_model(cfg, torch.bfloat16, seed=3)
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), n  # seeded: reproducible


def test_random_model_runs_a_prompt():
    cfg = ModelConfig.from_dir(ensure_tiny_model())
    model = build_random_model(cfg, torch.float32)
    p = build_prompt([], seed=1)
    logits = tandem_logits(model, cfg, p)
    assert logits.shape == (len(p.ids), cfg.text.vocab_size)
    assert torch.isfinite(logits).all()
