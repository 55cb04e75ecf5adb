"""Fused MoE as two grouped GEMMs over expert-sorted rows (the scheme of vLLM's fused_moe).

``moe_align_block_size`` groups the T*k (token, slot) rows by expert in runs padded to
BLOCK_M, so every BLOCK_M tile of rows belongs to a single expert and one program multiplies
it by that expert's weight tile. Kernel 1 computes gate and up tiles side by side and applies
SiLU-and-mul before storing, so the [T*k, 2I] intermediate never reaches memory; kernel 2 is
the down projection, scaled by the routing weight. The k rows of a token are summed last.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import dot_precision
from kernels.moe import moe_align_block_size


@triton.jit
def _moe_gemm_kernel(
    a_ptr,
    w_ptr,
    c_ptr,
    topk_w_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_ptr,
    N,
    K,
    num_rows,
    stride_am,
    stride_we,
    stride_wn,
    stride_cm,
    A_ROW_DIV: tl.constexpr,  # a row = flat id // A_ROW_DIV (k for x, 1 for the intermediate)
    GATED: tl.constexpr,  # W holds [gate; up] rows: out = silu(a @ gate^T) * (a @ up^T)
    MUL_WEIGHT: tl.constexpr,  # scale each row by its routing weight
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    mask_m = ids < num_rows  # padding rows carry id == num_rows
    a_rows = (ids // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_base = w_ptr + expert * stride_we

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        w_mask = mask_k[:, None] & mask_n[None, :]
        acc += tl.dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), input_precision=DOT_PRECISION)
        if GATED:
            w_up = tl.load(w_ptrs + N * stride_wn, mask=w_mask, other=0.0)
            acc_up += tl.dot(a, w_up, input_precision=DOT_PRECISION)

    if GATED:
        # Round gate and up to the activation dtype first, as the unfused linear outputs are.
        gate = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
        up = acc_up.to(c_ptr.dtype.element_ty).to(tl.float32)
        acc = gate * tl.sigmoid(gate) * up
    if MUL_WEIGHT:
        acc *= tl.load(topk_w_ptr + ids, mask=mask_m, other=0.0)[:, None]
    c_ptrs = c_ptr + ids.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _launch(
    a: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    topk_weights: torch.Tensor,
    align: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    a_row_div: int,
    gated: bool,
    mul_weight: bool,
    block_m: int,
    block_n: int,
    block_k: int,
) -> None:
    sorted_ids, expert_ids, num_post = align
    n = c.shape[1]
    k = a.shape[1]
    assert a.stride(1) == 1 and c.stride(1) == 1 and w.is_contiguous(), "row-major operands"
    assert w.shape[1] == (2 * n if gated else n) and w.shape[2] == k, (w.shape, n, k)
    grid = (sorted_ids.shape[0] // block_m, triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a,
        w,
        c,
        topk_weights,
        sorted_ids,
        expert_ids,
        num_post,
        n,
        k,
        c.shape[0],
        a.stride(0),
        w.stride(0),
        w.stride(1),
        c.stride(0),
        A_ROW_DIV=a_row_div,
        GATED=gated,
        MUL_WEIGHT=mul_weight,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_PRECISION=dot_precision(a.dtype),
    )


def fused_moe_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    block_m: int = 64,
    block_n: int = 64,
    block_k: int = 32,
) -> torch.Tensor:
    """Two grouped GEMMs; same contract as ``kernels.moe.fused_moe``."""
    # T tokens, k experts per token, D hidden, I intermediate, E experts
    t, d = x.shape
    num_experts, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    assert topk_weights.is_contiguous() and x.stride(1) == 1
    if t == 0:
        return torch.zeros_like(x)
    align = moe_align_block_size(topk_ids, num_experts, block_m)
    inter = torch.empty(t * top_k, two_i // 2, dtype=x.dtype, device=x.device)  # [T*k, I]
    _launch(x, w13, inter, topk_weights, align, top_k, True, False, block_m, block_n, block_k)
    # fp32 per-slot outputs so the k-way sum rounds once.
    down = torch.empty(t * top_k, d, dtype=torch.float32, device=x.device)  # [T*k, D]
    _launch(inter, w2, down, topk_weights, align, 1, False, True, block_m, block_n, block_k)
    return down.view(t, top_k, d).sum(dim=1).to(x.dtype)
