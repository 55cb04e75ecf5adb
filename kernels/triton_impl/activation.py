"""Triton kernel for :func:`kernels.activation.silu_and_mul`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import use_pdl
from kernels.triton_impl.pdl import pdl_enter


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_xt, stride_ot, I, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(x_ptr + t * stride_xt + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + t * stride_xt + I + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)  # torch rounds silu first
    tl.store(out_ptr + t * stride_ot + offs, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    # T tokens, I intermediate
    t, two_i = x.shape
    inter = two_i // 2
    assert x.stride(1) == 1, x.stride()
    out = torch.empty(t, inter, dtype=x.dtype, device=x.device)  # [T, I]
    if t == 0:
        return out
    block = 1024
    pdl = use_pdl(x)
    _silu_and_mul_kernel[(t, triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), inter, BLOCK=block, PDL=pdl, launch_pdl=pdl
    )
    return out
