"""ERNIE-4.5 model family: build from a config, load from a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.config import ModelConfig
from engine.layers.moe import Router
from engine.layers.rotary import TextRotary, VisionRotary
from engine.models.ernie45 import Ernie45ForCausalLM
from engine.models.ernie45_vl import Ernie45VLForConditionalGeneration
from engine.models.loader import WeightLoadError, load_weights
from engine.quantization import quantize_model

ErnieModel = Ernie45ForCausalLM | Ernie45VLForConditionalGeneration

__all__ = [
    "ErnieModel",
    "WeightLoadError",
    "build_model",
    "build_random_model",
    "language_layers",
    "load_model",
]


def build_model(cfg: ModelConfig) -> ErnieModel:
    if cfg.is_multimodal:
        return Ernie45VLForConditionalGeneration(cfg)
    return Ernie45ForCausalLM(cfg.text)


def language_layers(model: ErnieModel) -> nn.ModuleList:
    """The decoder layers: what weight-only quantization replaces (the embedding, the LM
    head and the vision tower stay in float, as FastDeploy keeps them)."""
    lm = model.language_model if isinstance(model, Ernie45VLForConditionalGeneration) else model
    return lm.model.layers


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantization: str | None = None,
) -> tuple[ErnieModel, ModelConfig]:
    """Config + weights from a checkpoint directory -> an eval-mode model on `device`.

    `quantization` ("wint8" | "wint4") quantizes the decoder layers on the host once the
    weights are loaded, before the move, so the device only ever holds the quantized model."""
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device="cpu")
    for module in model.modules():
        if isinstance(module, Ernie45ForCausalLM):
            module.tie_weights()
    _init_buffers(model, cfg)
    load_weights(model, cfg, path)
    if quantization is not None:
        quantize_model(language_layers(model), quantization, scale_dtype=dtype)
    _cast(model, dtype, device)
    return model.eval(), cfg


def _cast(model: nn.Module, dtype: torch.dtype, device: str | torch.device) -> None:
    """Move to `device` and `dtype`, except routers, which ERNIE runs in fp32, and quantized
    weights, which stay integers."""
    model.to(device=device)
    for module in model.modules():
        if isinstance(module, Router):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)


def _init_buffers(model: nn.Module, cfg: ModelConfig) -> None:
    """`to_empty` leaves buffers uninitialised: recompute the rotary tables."""
    for module in model.modules():
        if isinstance(module, (TextRotary, VisionRotary)):
            module.inv_freq = module.inv_freq.float()  # angles in fp32 whatever the model dtype
            module.reset_tables()
    for name, p in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            torch.nn.init.zeros_(p)  # optional in checkpoints: zero means no correction


def build_random_model(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    std: float = 0.02,
    quantization: str | None = None,
) -> ErnieModel:
    """The model of `cfg` with random weights built straight on `device` (the `dummy` load
    format): for benchmarks at real shapes without a checkpoint on disk. Parameters are
    allocated in `dtype` directly (a 28B model never exists in fp32); routers stay fp32.
    `quantization` quantizes the decoder layers afterwards, on `device`."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = build_model(cfg)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, Ernie45ForCausalLM):
            module.tie_weights()
    _init_buffers(model, cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias") or name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # norm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
    if quantization is not None:
        quantize_model(language_layers(model), quantization)
    return model.eval()
