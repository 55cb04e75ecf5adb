"""Triton kernel for :func:`kernels.rotary.rotary_embedding`: one program per token rotates all
its q and k heads in place, reading cos/sin once per token."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels._dispatch import interpreting, next_pow2, use_pdl
from kernels.triton_impl.pdl import pdl_enter


@triton.jit
def _rotate_heads(
    x_ptr,
    stride_t,
    stride_h,
    t,
    cos,
    sin,
    H: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Load each head's D values as one contiguous row and split the interleaved pairs in
    # registers: two stride-2 loads and stores per token were ~10x slower (412 us per
    # layer at 8192 tokens on an H100).
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, 2 * BLOCK_P)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < 2 * HALF)
    ptrs = x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)  # [BLOCK_H, 2 * BLOCK_P]
    a, b = tl.split(tl.reshape(x.to(tl.float32), [BLOCK_H, BLOCK_P, 2]))  # even, odd
    ra = a * cos[None, :] - b * sin[None, :]
    rb = b * cos[None, :] + a * sin[None, :]
    out = tl.reshape(tl.join(ra, rb), [BLOCK_H, 2 * BLOCK_P]).to(x.dtype)
    tl.store(ptrs, out, mask=mask)
    return out


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    cache_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_pos_axis,
    WRITE_KV: tl.constexpr,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    HW_PAIRS: tl.constexpr,  # 0 for 1-D positions; else the leading pairs that use h / w
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < D // 2
    if HW_PAIRS == 0:
        pos = tl.load(pos_ptr + t + offs_p * 0)  # [BLOCK_P], all the same position
    else:
        # Pair j reads position row h (1) / w (2) alternately, then t (0) for the tail.
        axis = tl.where(offs_p < HW_PAIRS, 1 + offs_p % 2, 0)
        pos = tl.load(pos_ptr + axis * stride_pos_axis + t, mask=mask_p, other=0)
    row = cache_ptr + pos.to(tl.int64) * D
    cos = tl.load(row + offs_p, mask=mask_p, other=1.0)
    sin = tl.load(row + D // 2 + offs_p, mask=mask_p, other=0.0)
    _rotate_heads(q_ptr, stride_qt, stride_qh, t, cos, sin, HQ, BLOCK_HQ, D // 2, BLOCK_P)
    k = _rotate_heads(k_ptr, stride_kt, stride_kh, t, cos, sin, HKV, BLOCK_HKV, D // 2, BLOCK_P)
    if WRITE_KV:  # the rotated k and v straight into the paged cache (slot < 0: padding)
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            offs_h = tl.arange(0, BLOCK_HKV)
            offs_d = tl.arange(0, 2 * BLOCK_P)
            mask = (offs_h[:, None] < HKV) & (offs_d[None, :] < D)
            dst = slot * (HKV * D) + offs_h[:, None] * D + offs_d[None, :]
            tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
            v_src = v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
            tl.store(v_cache_ptr + dst, tl.load(v_src, mask=mask, other=0.0), mask=mask)


def rotary_embedding_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    hw_pairs: int,
    kv_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Launch one program per token. Shapes are checked by the caller. `kv_write` =
    (v, k_cache, v_cache, slot_mapping): also write rotated k and v into the cache."""
    # T tokens, Hq/Hkv heads, D head dim
    t, hq, d = q.shape
    hkv = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1, "head dim must be contiguous"
    assert cos_sin_cache.is_contiguous() and positions.stride(-1) == 1
    if t == 0:
        return
    v, k_cache, v_cache, slots = kv_write if kv_write is not None else (k, k, k, positions)
    assert v.stride(2) == 1, "v's head dim must be contiguous"
    pdl = use_pdl(q)
    _rotary_kernel[(t,)](
        q,
        k,
        positions,
        cos_sin_cache,
        v,
        k_cache,
        v_cache,
        slots,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        positions.stride(0) if positions.dim() == 2 else 0,
        WRITE_KV=kv_write is not None,
        HQ=hq,
        HKV=hkv,
        D=d,
        HW_PAIRS=hw_pairs,
        BLOCK_HQ=next_pow2(hq),
        BLOCK_HKV=next_pow2(hkv),
        BLOCK_P=next_pow2(d // 2),
        PDL=pdl,
        launch_pdl=pdl,
    )


@triton.jit
def _rope_table_kernel(
    pos_ptr, inv_freq_ptr, axis_ptr, table_ptr, T, stride_p, HALF: tl.constexpr,
    AXES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, LIBDEVICE: tl.constexpr,
):  # fmt: skip
    # table[t] = cos(p * inv_freq) | sin(p * inv_freq), p = positions[axis[j], t] for pair j
    # (AXES = 3) or positions[t] (AXES = 1); libdevice cos/sin, as torch's CUDA cos/sin
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, BLOCK_J)
    mask_j = offs_j < HALF
    mask = (offs_t < T)[:, None] & mask_j[None, :]
    if AXES == 3:
        axis = tl.load(axis_ptr + offs_j, mask=mask_j, other=0)  # [BLOCK_J]
        pos = tl.load(pos_ptr + axis[None, :] * stride_p + offs_t[:, None], mask=mask, other=0)
    else:
        pos = tl.load(pos_ptr + offs_t[:, None] + offs_j[None, :] * 0, mask=mask, other=0)
    inv_freq = tl.load(inv_freq_ptr + offs_j, mask=mask_j, other=0.0)
    angle = pos.to(tl.float32) * inv_freq[None, :]  # [BLOCK_T, BLOCK_J]
    row = table_ptr + offs_t[:, None].to(tl.int64) * (2 * HALF) + offs_j[None, :]
    if LIBDEVICE:
        tl.store(row, libdevice.cos(angle), mask=mask)
        tl.store(row + HALF, libdevice.sin(angle), mask=mask)
    else:  # the interpreter has no libdevice
        tl.store(row, tl.cos(angle), mask=mask)
        tl.store(row + HALF, tl.sin(angle), mask=mask)


def rope_table_triton(
    positions: torch.Tensor, inv_freq: torch.Tensor, axis: torch.Tensor | None
) -> torch.Tensor:
    half = inv_freq.shape[0]
    t = positions.shape[-1]
    table = torch.empty(t, 2 * half, dtype=torch.float32, device=positions.device)
    if t == 0:
        return table
    assert positions.stride(-1) == 1 and inv_freq.is_contiguous(), positions.stride()
    axes = 3 if positions.dim() == 2 else 1
    if axes == 3:
        assert axis is not None and axis.is_contiguous() and positions.shape[0] == 3
    block_t = 16
    _rope_table_kernel[(triton.cdiv(t, block_t),)](
        positions, inv_freq, axis if axis is not None else inv_freq, table, t,
        positions.stride(0) if axes == 3 else 0, HALF=half, AXES=axes, BLOCK_T=block_t,
        BLOCK_J=next_pow2(half), LIBDEVICE=not interpreting(), num_warps=4,
    )  # fmt: skip
    return table
