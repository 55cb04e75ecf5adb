"""Weight-only quantized stand-ins for `Linear`/`MergedLinear` and the stacked `Experts`.

Each keeps the forward signature of the layer it replaces and dequantizes its weight to the
activation dtype on every call, then runs the float path (`F.linear`, `kernels.moe.fused_moe`).
That saves memory at rest, not time: a GEMM that reads the packed integers directly (a
w8a16 / w4a16 kernel, grouped for the experts) is the follow-up that makes it fast.

Integer weights and scales are parameters (`requires_grad=False`) so `model.parameters()`
counts and moves them; loaders cast floating parameters only, so the integers keep their
dtype while scales follow the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.linear import Linear, MergedLinear
from engine.layers.moe import Experts
from engine.quantization.weights import QuantConfig, dequantize, quantize
from kernels.moe import fused_moe


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class QuantizedLinear(nn.Module):
    """`y = x @ dequantize(qweight, scale).T + bias`, for a `Linear` or `MergedLinear`."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        in_features: int,
        out_sizes: list[int],
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(out_sizes)
        self.out_sizes = list(out_sizes)  # MergedLinear's split, read by attention
        self.qweight = _frozen(qweight)  # [N, K] int8 or [N, K/2] packed uint8
        self.scale = _frozen(scale)  # [N, G]
        self.bias = _frozen(bias) if bias is not None else None

    @classmethod
    def from_linear(
        cls, linear: Linear | MergedLinear, cfg: QuantConfig, scale_dtype: torch.dtype | None
    ) -> QuantizedLinear:
        qweight, scale = quantize(linear.weight, cfg, scale_dtype)
        out_sizes = linear.out_sizes if isinstance(linear, MergedLinear) else [linear.out_features]
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(qweight, scale, bias, linear.in_features, out_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.qweight, self.scale, x.dtype), self.bias)

    def extra_repr(self) -> str:
        bits = 4 if self.qweight.dtype == torch.uint8 else 8
        groups = self.scale.shape[-1]
        return f"in={self.in_features}, out={self.out_features}, int{bits}, groups={groups}"


class QuantizedExperts(nn.Module):
    """E quantized gated-SiLU experts: gate_up `[E, 2I, D]`, down `[E, D, I]` as integers.

    A step dequantizes only the expert weights its tokens use, without reading the ids on
    the host (so decode stays CUDA-graph capturable): with fewer (token, slot) pairs than
    experts, each pair gets its own dequantized copy of its expert and the ids are renumbered
    to those copies; otherwise all E experts are dequantized once.
    """

    def __init__(
        self,
        gate_up: tuple[torch.Tensor, torch.Tensor],
        down: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        super().__init__()
        self.gate_up_qweight, self.gate_up_scale = map(_frozen, gate_up)
        self.down_qweight, self.down_scale = map(_frozen, down)
        self.num_experts = self.gate_up_scale.shape[0]

    @classmethod
    def from_experts(
        cls, experts: Experts, cfg: QuantConfig, scale_dtype: torch.dtype | None
    ) -> QuantizedExperts:
        return cls(
            quantize(experts.gate_up_proj, cfg, scale_dtype),
            quantize(experts.down_proj, cfg, scale_dtype),
        )

    def forward(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        add: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # T tokens, k experts per token, E experts
        t, k = ids.shape
        if t * k < self.num_experts:  # decode: a copy per (token, slot) pair, no host sync
            picked = ids.reshape(-1).long()  # [T*k]
            ids = torch.arange(t * k, device=ids.device, dtype=torch.int32).view(t, k)
            w13 = dequantize(self.gate_up_qweight[picked], self.gate_up_scale[picked], x.dtype)
            w2 = dequantize(self.down_qweight[picked], self.down_scale[picked], x.dtype)
        else:
            w13 = dequantize(self.gate_up_qweight, self.gate_up_scale, x.dtype)  # [E, 2I, D]
            w2 = dequantize(self.down_qweight, self.down_scale, x.dtype)  # [E, D, I]
        return fused_moe(x, w13, w2, weights, ids, add=add)
