"""Triton kernel for :func:`kernels.kv_cache.write_kv`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import next_pow2


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_vt,
    HD: tl.constexpr,  # num_kv_heads * head_dim: one token's row in the cache
    BLOCK: tl.constexpr,
):
    # One program per token: a token's keys are one contiguous row of Hkv*D elements both in
    # k (heads packed, tokens possibly strided, e.g. a view into a fused qkv) and in the cache.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < HD
    dst = slot.to(tl.int64) * HD + offs
    kx = tl.load(k_ptr + t.to(tl.int64) * stride_kt + offs, mask=mask)
    vx = tl.load(v_ptr + t.to(tl.int64) * stride_vt + offs, mask=mask)
    tl.store(k_cache_ptr + dst, kx, mask=mask)
    tl.store(v_cache_ptr + dst, vx, mask=mask)


def write_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Launch one program per token. Shapes are checked by the caller."""
    t, hkv, d = k.shape
    if t == 0:
        return
    # The kernel reads a token's Hkv*D values as one run: heads and dims must be packed.
    for x in (k, v):
        assert x.stride(2) == 1 and x.stride(1) == d, f"k/v heads must be packed: {x.stride()}"
    assert slot_mapping.is_contiguous()
    _write_kv_kernel[(t,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        v.stride(0),
        HD=hkv * d,
        BLOCK=next_pow2(hkv * d),
    )
