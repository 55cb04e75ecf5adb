"""`quantize_model`: swap a module tree's linears and experts for quantized ones, in place.

A transform on layers, not a branch in model code: the model is built and loaded in float
as always, then every `Linear`/`MergedLinear` and `Experts` under the module passed is
replaced by its quantized stand-in. Which part of a model to pass is the model's business
(`engine.models` passes the language model's decoder layers: the embedding, the LM head,
the routers, the norms and the vision tower stay in float, as FastDeploy keeps them).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.layers.linear import Linear, MergedLinear
from engine.layers.moe import Experts
from engine.quantization.layers import QuantizedExperts, QuantizedLinear
from engine.quantization.weights import QuantConfig

log = logging.getLogger("engine.quantization")


def quantize_model(
    model: nn.Module,
    method: str,
    group_size: int = 128,
    scale_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Quantize every linear and expert stack under `model` with `method` ("wint8" or
    "wint4"); returns `model`. Scales are rounded to `scale_dtype` (default: each weight's
    own dtype), the dtype they will be served in, before the weights are rounded to them.
    """
    cfg = QuantConfig(method, group_size)
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, (Linear, MergedLinear, Experts))
    ]
    swapped: list[nn.Module] = []
    for parent, name in targets:  # one at a time: each float weight is freed once replaced
        swapped.append(_quantized(parent.get_submodule(name), cfg, scale_dtype))
        setattr(parent, name, swapped[-1])
    experts = sum(isinstance(q, QuantizedExperts) for q in swapped)
    log.info(
        "weight-only %s: quantized %d linears and %d expert stacks",
        method,
        len(swapped) - experts,
        experts,
    )
    return model


def _quantized(
    module: nn.Module, cfg: QuantConfig, scale_dtype: torch.dtype | None
) -> QuantizedLinear | QuantizedExperts:
    if isinstance(module, Experts):
        return QuantizedExperts.from_experts(module, cfg, scale_dtype)
    assert isinstance(module, (Linear, MergedLinear)), type(module)
    return QuantizedLinear.from_linear(module, cfg, scale_dtype)
