"""Bytes of a model's weights, float against quantized, for the tiny and the 28B-A3B model.

    .venv/bin/python -m engine.quantization.memory

Counts parameters only (weights, integer weights, scales, biases; the tied embedding once),
not buffers such as rotary tables. The 28B-A3B model is built on the meta device, so the
numbers come from the very code that quantizes, with no memory allocated.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig
from engine.models import build_model, language_layers
from engine.quantization.transform import quantize_model


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _meta_model(cfg: ModelConfig, dtype: torch.dtype, method: str | None) -> nn.Module:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = build_model(cfg)
    finally:
        torch.set_default_dtype(default)
    if method is not None:
        quantize_model(language_layers(model), method)
    return model


def memory_table(cfg: ModelConfig) -> dict[str, int]:
    """Weight bytes of the whole model (vision tower included) per format."""
    rows = {"fp32": _meta_model(cfg, torch.float32, None)}
    rows["bf16"] = _meta_model(cfg, torch.bfloat16, None)
    for method in ("wint8", "wint4"):
        rows[f"{method} (bf16 scales)"] = _meta_model(cfg, torch.bfloat16, method)
    return {name: weight_bytes(model) for name, model in rows.items()}


def _28b_config() -> ModelConfig:
    from transformers import Ernie4_5_VLMoeConfig  # its defaults are the 28B-A3B shapes

    return ModelConfig.from_dict(Ernie4_5_VLMoeConfig().to_dict())


def main() -> None:
    from engine.tiny import ensure_tiny_model

    for name, cfg in (
        ("tiny-ernie-vl", ModelConfig.from_dir(ensure_tiny_model())),
        ("ERNIE-4.5-VL-28B-A3B", _28b_config()),
    ):
        table = memory_table(cfg)
        bf16 = table["bf16"]
        print(f"\n{name}\n| format | weight bytes | GiB | vs bf16 |\n|---|---:|---:|---:|")
        for fmt, n in table.items():
            print(f"| {fmt} | {n:,} | {n / 2**30:.3f} | {n / bf16:.3f} |")


if __name__ == "__main__":
    main()
