"""Row argmax of logits: greedy decoding's token choice in one launch.

``torch.argmax`` over one row of the 28B vocabulary (103424 logits) is a single-block
reduction: 23 us on an H200, plus 4 us for the float32 cast the sampler made first, between
every decode step and the next (bench/RESULTS.md, 2026-12-04). The Triton kernel splits each
row over many programs and reads the 16-bit logits as they are (their float32 upcast is exact
and keeps the order, so the argmax is the same).

Ties go to the lowest index, as ``torch.argmax``. NaN counts as larger than every number
(torch returns the first NaN; here a NaN after an earlier ``+inf`` loses to it).
"""

from __future__ import annotations

import torch

from kernels._dispatch import Impl, use_triton


def argmax(
    logits: torch.Tensor, impl: Impl = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of `[B, V]` logits (any float dtype) -> `[B]` int64, written
    into `out` (`[B]` int64, contiguous) when given."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    if out is not None:
        assert out.shape == logits.shape[:1] and out.dtype == torch.int64, (out.shape, out.dtype)
        assert out.is_contiguous() and out.device == logits.device, "out: contiguous, same device"
    # (float64 would lose distinctions in the kernel's float32 compares: torch's argmax)
    triton_dtype = logits.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if use_triton(logits, impl) and triton_dtype and logits.shape[0] > 0 and logits.shape[1] > 0:
        from kernels.triton_impl.argmax import argmax_triton

        return argmax_triton(logits, out)
    ref = argmax_ref(logits)
    return ref if out is None else out.copy_(ref)


def argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)
