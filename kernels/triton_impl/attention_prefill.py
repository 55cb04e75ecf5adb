"""Chunked varlen prefill over a paged KV cache: tiles of queries x keys, online softmax.

Grid ``(T // BLOCK_Q + B, Hkv)``. A tile's rows are (query, head) pairs: BLOCK_Q consecutive
queries of one sequence times the GROUP query heads that share kv head ``program_id(1)``, so
GQA heads reuse each loaded key tile (rows = BLOCK_Q * GROUP <= BLOCK_M, no power-of-two
padding of the group). Sequence b's tiles are numbered from ``query_start_loc[b] // BLOCK_Q + b``;
that over-counts by at most one tile per sequence, which lets a program find its sequence from
``query_start_loc`` alone, with no host sync and a grid fixed by shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import dot_precision, next_pow2

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qsl_ptr,
    out_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    num_seqs,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # KV cache block size (tokens per block)
    BLOCK_Q: tl.constexpr,  # queries per tile; BLOCK_Q * GROUP <= BLOCK_M
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,  # >= num_seqs, to find this tile's sequence in one vector op
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)

    # Which sequence owns tile `pid`: the last b whose first tile number is <= pid.
    offs_b = tl.arange(0, BLOCK_B)
    starts = tl.load(qsl_ptr + offs_b, mask=offs_b < num_seqs, other=0)
    first_tile = starts // BLOCK_Q + offs_b
    b = tl.sum(((first_tile <= pid) & (offs_b < num_seqs)).to(tl.int32), axis=0) - 1
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    tile = pid - (q_start // BLOCK_Q + b)
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    context_len = seq_len - q_len  # tokens cached before this chunk

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_idx = tile * BLOCK_Q + offs_m // GROUP  # [BLOCK_M] query index within the sequence
    heads = kvh * GROUP + offs_m % GROUP  # [BLOCK_M]
    mask_m = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
    mask_d = offs_d < D
    q_pos = context_len + q_idx  # absolute position: attends to keys <= q_pos
    q_rows = (q_start + q_idx).to(tl.int64)
    q_ptrs = q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: no (-inf) - (-inf) = nan
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys past the tile's last query position are masked for every row: stop there.
    kv_end = tl.minimum(seq_len, context_len + (tile + 1) * BLOCK_Q)
    for start in range(0, kv_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] absolute key positions
        mask_n = pos < kv_end
        block = tl.load(block_tables_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=mask_n, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_off = slot[:, None] * (HKV * D) + kvh * D + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N]
        visible = mask_n[None, :] & (pos[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.maximum(l_i, 1e-30)[:, None]  # l_i > 0 on valid rows: key 0 is visible
    out_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def paged_attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    block_m: int = 64,
    block_n: int = 32,
) -> torch.Tensor:
    """Varlen prefill attention; same contract as ``paged_attention``.

    ``block_m`` rows per tile (query x head pairs, >= 16 for tensor cores), ``block_n`` keys.
    """
    # T tokens, B sequences, Hq/Hkv heads, D head dim
    t, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    b = seq_lens.shape[0]
    group = hq // hkv
    assert block_m >= group, f"block_m={block_m} must hold one query's {group} heads"
    assert q.stride(2) == 1, f"q's head dim must be contiguous: {q.stride()}"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.stride(1) == 1 and seq_lens.is_contiguous()
    assert query_start_loc.is_contiguous()
    out = torch.empty_like(q)  # [T, Hq, D]
    if t == 0 or b == 0:
        return out
    block_q = block_m // group
    grid = (t // block_q + b, hkv)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        b,
        HKV=hkv,
        GROUP=group,
        D=d,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, next_pow2(d)),
        BLOCK_B=next_pow2(b),
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return out
