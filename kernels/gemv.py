"""Small-M linear for decode: ``F.linear`` as a Triton weight-stream GEMV for 1-4 rows.

``linear(x, w, b)`` is what ``engine.layers.linear`` calls. On CUDA with at most
``GEMV_MAX_M`` rows (and ``GEMV_ENABLED``) it runs ``kernels.triton_impl.gemv``; otherwise, and
always on CPU, ``F.linear``. The switch is read when a step is traced, so a CUDA graph keeps the
path it was captured with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import Impl, use_triton

# On an H100 the GEMV beats cuBLAS at M=1 on every 28B decode shape (5-22%) but loses at
# M=4 (fp32 FMAs, x re-read per row tile), so only single-row steps take it (bench/RESULTS.md).
GEMV_ENABLED = True
GEMV_MAX_M = 1


def use_gemv(x: torch.Tensor, weight: torch.Tensor, impl: Impl = None) -> bool:
    if impl is None and not GEMV_ENABLED:
        return False
    if x.dim() != 2 or not 1 <= x.shape[0] <= GEMV_MAX_M or x.dtype != weight.dtype:
        return False
    if x.stride(1) != 1 or weight.stride(1) != 1:
        return False
    return use_triton(x, impl)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, impl: Impl = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; x ``[M, K]``, weight ``[N, K]``, bias ``[N]``."""
    if not use_gemv(x, weight, impl):
        return F.linear(x, weight, bias)
    from kernels.triton_impl.gemv import gemv_triton

    return gemv_triton(x, weight, bias)
