"""Prefill MoE on torch's grouped GEMM (``F.grouped_mm``: CUTLASS wgmma/TMA kernels on Hopper).

At prefill every expert sees hundreds of rows, so the expert GEMMs are compute-bound and
want Hopper's warpgroup MMA, which the portable Triton kernel in ``moe.py`` does not reach
(~330-390 TFLOP/s at T=8192). Here the T*k (token, slot) rows are sorted by expert without
padding, x is gathered once, both projections run as grouped GEMMs over the jagged groups
(``offs`` = end row of each expert), and one Triton pass gathers each token's k rows back,
weights them in fp32, sums, rounds once and adds the shared experts.

Rounding follows ``kernels.moe.fused_moe_ref``: each expert's down output is rounded to x's
dtype, weighted and summed in fp32. Nothing reads the device on the host (no sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.activation import silu_and_mul

# Use this path from this many (token, slot) rows up (prefill); below it the Triton kernels
# win (decode is a weight stream). From bench/moe_bench.py on an H100 (one layer, k=6):
# T=512 (3072 rows) Triton 0.83 vs 1.06 ms; T=1024 (6144 rows) 1.17 vs 0.93 ms; T=8192
# 4.08 vs 2.77 ms (284 -> 418 TFLOP/s). 0 disables.
GROUPED_MIN_ROWS = 6144


def grouped_mm_fn():  # type: ignore[no-untyped-def]
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def use_grouped(x: torch.Tensor, rows: int) -> bool:
    if not GROUPED_MIN_ROWS or rows < GROUPED_MIN_ROWS or x.dtype != torch.bfloat16:
        return False
    if grouped_mm_fn() is None:
        return False
    return not x.is_cuda or torch.cuda.get_device_capability(x.device) >= (9, 0)


@triton.jit
def _combine_sorted_kernel(
    y_ptr,
    pos_ptr,
    w_ptr,
    add_ptr,
    out_ptr,
    D,
    K: tl.constexpr,
    HAS_ADD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out[t] = round(sum_j w[t, j] * y[pos[t*K + j]]) (+ add[t], rounded like a separate add)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(pos_ptr + t * K + j).to(tl.int64)
        w = tl.load(w_ptr + t * K + j)
        y = tl.load(y_ptr + row * D + offs, mask=mask, other=0.0)
        acc += y.to(tl.float32) * w
    out = acc.to(out_ptr.dtype.element_ty)
    if HAS_ADD:
        add = tl.load(add_ptr + t * D + offs, mask=mask, other=0.0)
        out = (out.to(tl.float32) + add.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * D + offs, out, mask=mask)


def fused_moe_grouped(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``kernels.moe.fused_moe`` (shapes checked there)."""
    # T tokens, k slots, D hidden, I intermediate, E experts
    t, d = x.shape
    num_experts, k = w13.shape[0], topk_ids.shape[1]
    assert topk_weights.is_contiguous(), topk_weights.stride()
    assert w13.is_contiguous() and w2.is_contiguous(), "expert weights [E, N, K] row-major"
    assert add is None or (add.shape == x.shape and add.is_contiguous()), add
    gmm = grouped_mm_fn()
    flat = topk_ids.reshape(-1).long()  # [T*k]
    order = torch.argsort(flat, stable=True)  # [T*k] flat slot ids grouped by expert
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))  # [E]
    offs = counts.cumsum(0, dtype=torch.int32)  # [E] end row of each expert's group
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=x.device)  # [T*k] sorted row of a slot
    xs = x.index_select(0, order // k)  # [T*k, D]
    gate_up = gmm(xs, w13.transpose(1, 2), offs=offs)  # [T*k, 2I]
    y = gmm(silu_and_mul(gate_up), w2.transpose(1, 2), offs=offs)  # [T*k, D]
    assert y.shape == (t * k, d) and y.is_contiguous(), (y.shape, y.stride())
    out = torch.empty_like(x)  # [T, D]
    if t == 0:
        return out
    block = 1024
    _combine_sorted_kernel[(t, triton.cdiv(d, block))](
        y,
        pos,
        topk_weights,
        x if add is None else add,
        out,
        d,
        K=k,
        HAS_ADD=add is not None,
        BLOCK_D=block,
    )
    return out
