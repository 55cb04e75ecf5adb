"""Triton kernel for :func:`kernels.rms_norm.rms_norm`: one program per row, one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import next_pow2, use_pdl
from kernels.triton_impl.pdl import pdl_enter

NUM_WARPS = 4
"""Warps of a norm launch. The fused norm + router launch (`moe_routing.gate_route_triton`
with ``norm=``) uses the same count: the row's sum of squares is then reduced in the same
order, so both give bit-identical outputs."""


@triton.jit
def add_residual(x, r):
    """``x + r`` in fp32, rounded to x's dtype, as the unfused model adds."""
    return (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)


@triton.jit
def rms_rstd(x, eps, D: tl.constexpr):
    """``1 / sqrt(mean(x^2) + eps)`` in fp32 over a whole row x ``[BLOCK_D]`` (0 past D)."""
    h = x.to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)


@triton.jit
def rms_apply(x, rstd, w):
    """``(x * rstd)`` rounded to x's dtype, times the weight in fp32, rounded again."""
    normed = (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)
    return (normed * w.to(tl.float32)).to(x.dtype)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    eps,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = add_residual(x, r)
        tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
    rstd = rms_rstd(x, eps, D)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + offs, rms_apply(x, rstd, w), mask=mask)


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch one program per token. Shapes are checked by the caller."""
    # T tokens, D hidden
    t, d = x.shape
    assert x.stride(1) == 1 and weight.is_contiguous(), "the hidden dim must be contiguous"
    out = torch.empty_like(x)  # [T, D]
    res_out = x if residual is None else torch.empty_like(x)
    if residual is not None:
        assert residual.stride(1) == 1, residual.stride()
    if t == 0:
        return out, res_out
    res = x if residual is None else residual  # placeholder pointer when unused
    pdl = use_pdl(x)
    _rms_norm_kernel[(t,)](
        x,
        res,
        weight,
        out,
        res_out,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        res_out.stride(0),
        eps,
        D=d,
        BLOCK_D=next_pow2(d),
        HAS_RESIDUAL=residual is not None,
        PDL=pdl,
        num_warps=NUM_WARPS,
        launch_pdl=pdl,
    )
    return out, res_out
