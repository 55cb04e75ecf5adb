"""SiLU-and-mul of a gated MLP: ``silu(x[:, :I]) * x[:, I:]`` in one pass.

Rounding follows the unfused torch ops in x's dtype: ``silu`` rounds its result, the product
rounds again. On GPU one launch replaces two (and one [T, I] round trip to memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import Impl, use_triton


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor, impl: Impl = None) -> torch.Tensor:
    """x ``[T, 2I]`` (gate columns, then up columns) -> ``[T, I]`` in x's dtype."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0, x.shape
    if not use_triton(x, impl):
        return silu_and_mul_ref(x)
    from kernels.triton_impl.activation import silu_and_mul_triton

    return silu_and_mul_triton(x)
