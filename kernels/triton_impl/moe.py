"""Fused MoE as two grouped GEMMs over expert-sorted rows (the scheme of vLLM's fused_moe).

``moe_align_block_size`` groups the T*k (token, slot) rows by expert in runs padded to
BLOCK_M, so every BLOCK_M tile of rows belongs to a single expert and one program multiplies
it by that expert's weight tile. Kernel 1 computes gate and up tiles side by side and applies
SiLU-and-mul before storing, so the [T*k, 2I] intermediate never reaches memory; kernel 2 is
the down projection, scaled by the routing weight. The k rows of a token are summed last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels._dispatch import dot_precision, use_pdl
from kernels.moe import moe_align_block_size
from kernels.triton_impl.gemv import fused_moe_decode
from kernels.triton_impl.moe_grouped import fused_moe_grouped, use_grouped
from kernels.triton_impl.moe_routing import ALIGN_MAX_ROWS, moe_align_triton, moe_combine_triton
from kernels.triton_impl.pdl import pdl_enter


@dataclass(frozen=True)
class MoeTiles:
    """Tile shape and pipelining of both grouped GEMMs (BLOCK_M also pads the expert runs)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# (max tokens, tiles), first match wins. Decode is a weight stream: each expert sees a few
# rows, so the smallest M tile tl.dot allows and long K tiles keep many loads in flight.
# Prefill has hundreds of rows per expert and wants square-ish, compute-dense tiles.
# Picked from the sweep in bench/gpu_bench.py (--moe-sweep) on an H100; see bench/RESULTS.md.
MOE_TILES: list[tuple[int, MoeTiles]] = [
    (128, MoeTiles(16, 64, 128, 4, 4)),  # T=1: 0.068 ms/layer (old 64x64x32: 0.097)
    (512, MoeTiles(32, 64, 128, 4, 3)),  # T=256: 0.561 ms (old 0.801)
    (4096, MoeTiles(128, 128, 64, 8, 3)),  # T=2048: 1.170 ms (old 1.789)
    (1 << 62, MoeTiles(64, 256, 64, 8, 3)),  # T=8192: 3.235 ms (old 6.772)
]


# Decode (at most this many tokens): per-(token, slot) GEMVs (kernels/triton_impl/gemv.py)
# instead of the grouped GEMM, whose 16-row dot tiles leave 1.1-1.8 waves at T=1. 0 = off.
# H100, 28B shapes, 2-warp GEMVs vs grouped, ms/layer: T=1 0.059 vs 0.069, T=2 0.096 vs 0.100,
# T=4 0.182 vs 0.185; full decode step (graph replay): b2 5.36 -> 5.07 ms, b4 7.39 -> 7.28.
DECODE_MAX_TOKENS = 4


BATCH_PDL = False
"""Past the decode sizes, the expert sort, both grouped GEMMs and the combine launch under
PDL (``kernels.triton_impl.pdl``): each may be scheduled while the launch before it drains,
as the decode chain's kernels are. Off until measured on a card (decode_step_bench variant
``batch-pdl``); read at trace time."""
BATCH_UP_PDL = False
"""With ``BATCH_PDL``: the up GEMM under PDL also while the shared experts run on the side
stream. Its programs, resident and waiting behind the sort, would hold the SM slots the
side stream's kernels need (as at decode: ``kernels.triton_impl.gemv.UP_PDL_BESIDE``)."""


def pick_tiles(num_tokens: int) -> MoeTiles:
    return next(tiles for bound, tiles in MOE_TILES if num_tokens <= bound)


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
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
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
    tiles: MoeTiles,
    pdl: bool = False,
) -> None:
    sorted_ids, expert_ids, num_post = align
    n = c.shape[1]
    k = a.shape[1]
    assert a.stride(1) == 1 and c.stride(1) == 1 and w.is_contiguous(), "row-major operands"
    assert w.shape[1] == (2 * n if gated else n) and w.shape[2] == k, (w.shape, n, k)
    assert sorted_ids.shape[0] % tiles.block_m == 0, (sorted_ids.shape, tiles)
    assert expert_ids.shape[0] == sorted_ids.shape[0] // tiles.block_m, expert_ids.shape
    grid = (sorted_ids.shape[0] // tiles.block_m, triton.cdiv(n, tiles.block_n))
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
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        DOT_PRECISION=dot_precision(a.dtype),
        PDL=pdl,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        launch_pdl=pdl,
    )


def fused_moe_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    tiles: MoeTiles | None = None,
    add: torch.Tensor | None = None,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    add_stream: torch.cuda.Stream | None = None,
    up_done: torch.cuda.Event | None = None,
) -> torch.Tensor:
    """Two grouped GEMMs; same contract as ``kernels.moe.fused_moe`` (``shared`` only on the
    decode path: callers check ``kernels.moe.shares_decode_launches``).

    Tiles come from ``MOE_TILES`` by token count unless given (``tiles`` or the block sizes).
    """
    # T tokens, k experts per token, D hidden, I intermediate, E experts
    t = x.shape[0]
    assert topk_weights.is_contiguous() and x.stride(1) == 1
    if t == 0:
        if up_done is not None:
            up_done.record(torch.cuda.current_stream(x.device))
        return torch.zeros_like(x)
    explicit = tiles is not None or bool(block_m or block_n or block_k)
    if not explicit and t <= DECODE_MAX_TOKENS:  # decode: no sort, two GEMV launches
        return fused_moe_decode(
            x,
            w13,
            w2,
            topk_weights,
            topk_ids.contiguous(),
            add=add,
            shared=shared,
            add_stream=add_stream,
            up_done=up_done,
        )
    assert shared is None, "shared experts ride only in the decode launches"
    out = _fused_moe_sorted(
        x, w13, w2, topk_weights, topk_ids, tiles, explicit, add, block_m, block_n, block_k,
        add_stream,
    )  # fmt: skip
    if up_done is not None:  # no launch between: the whole block
        up_done.record(torch.cuda.current_stream(x.device))
    return out


def _fused_moe_sorted(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    tiles: MoeTiles | None,
    explicit: bool,
    add: torch.Tensor | None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    add_stream: torch.cuda.Stream | None = None,
) -> torch.Tensor:
    # the prefill paths of fused_moe_triton: tokens sorted by expert, grouped GEMMs; `add`
    # may still be in the making on add_stream, joined just before the launch that reads it
    t, d = x.shape
    num_experts, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    if not explicit and use_grouped(x, t * top_k):  # prefill: torch's Hopper grouped GEMM
        if add_stream is not None:
            torch.cuda.current_stream(x.device).wait_stream(add_stream)
        return fused_moe_grouped(x, w13, w2, topk_weights, topk_ids, add=add)
    tiles = tiles or pick_tiles(t)
    if block_m or block_n or block_k:
        bm, bn, bk = block_m or tiles.block_m, block_n or tiles.block_n, block_k or tiles.block_k
        tiles = MoeTiles(bm, bn, bk)
    pdl = BATCH_PDL and use_pdl(x)
    if t * top_k <= ALIGN_MAX_ROWS:  # one launch instead of ~18
        align = moe_align_triton(topk_ids.contiguous(), num_experts, tiles.block_m, pdl=pdl)
    else:
        align = moe_align_block_size(topk_ids, num_experts, tiles.block_m)
    inter = torch.empty(t * top_k, two_i // 2, dtype=x.dtype, device=x.device)  # [T*k, I]
    up_pdl = pdl and (BATCH_UP_PDL or add_stream is None)
    _launch(x, w13, inter, topk_weights, align, top_k, True, False, tiles, pdl=up_pdl)
    # fp32 per-slot outputs so the k-way sum rounds once.
    down = torch.empty(t * top_k, d, dtype=torch.float32, device=x.device)  # [T*k, D]
    _launch(inter, w2, down, topk_weights, align, 1, False, True, tiles, pdl=pdl)
    # k-way sum, rounding and the optional add (shared experts) in one pass
    if add_stream is not None:
        torch.cuda.current_stream(x.device).wait_stream(add_stream)
    return moe_combine_triton(down.view(t, top_k, d), x.dtype, add, pdl=pdl)
