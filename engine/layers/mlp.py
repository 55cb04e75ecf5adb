"""Gated SiLU feed-forward (dense layers and ERNIE's shared experts)."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.linear import Linear, MergedLinear
from engine.parallel import current_tp, even_shard
from kernels.activation import silu_and_mul
from kernels.gemv import gated_linear


class GatedMLP(nn.Module):
    """Tensor parallel: the intermediate dimension is split (gate/up column-parallel, down
    row-parallel). The output is then a partial sum: `all_reduce=True` sums it here (dense
    layers); shared experts leave it to the MoE block, which reduces once for all parts."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        all_reduce: bool = False,
    ) -> None:
        super().__init__()
        self.tp = tp = current_tp()
        shard = even_shard(intermediate_size, tp, "MLP intermediate size")
        self.intermediate_size = shard.size
        self.gate_up_proj = MergedLinear(hidden_size, [], bias=bias, shards=[shard, shard])
        self.down_proj = Linear(
            intermediate_size, hidden_size, bias=bias, in_shard=shard, bias_here=tp.rank == 0
        )
        self.reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        down = self.down_proj
        if type(down) is Linear and gate_up.is_cuda and gate_up.dim() == 2:
            # decode: silu(gate) * up inside the down GEMV (kernels.gemv.GATED_FUSED)
            out = gated_linear(gate_up, down.weight, down.bias)
        else:  # a quantized down projection keeps its own forward
            out = down(silu_and_mul(gate_up))  # one launch on GPU
        return self.tp.all_reduce(out) if self.reduce else out
