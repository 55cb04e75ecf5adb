"""RMSNorm as ERNIE computes it: in fp32, cast back before the weight multiply.

`kernels.rms_norm` runs it (one Triton launch on GPU instead of ~7 elementwise kernels) and
can fold in the residual add that precedes every norm of a decoder layer.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.rms_norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., D]` -> normalised x, same shape and dtype."""
        out, _ = rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps)
        return out.view(x.shape)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual `[T, D]` -> (norm(x + residual), x + residual) in one pass."""
        return rms_norm(x, self.weight, self.eps, residual)
