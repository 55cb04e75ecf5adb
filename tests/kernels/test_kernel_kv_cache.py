"""write_kv: reference vs a per-token loop, Triton vs reference."""

from __future__ import annotations

import pytest
import torch

from kernels import write_kv, write_kv_ref
from kernels._dispatch import interpreting, triton_available

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)


def _inputs(t: int, hkv: int, d: int, block_size: int, dtype: torch.dtype):
    num_blocks = 6
    k = torch.randn(t, hkv, d).to(dtype)
    v = torch.randn(t, hkv, d).to(dtype)
    slots = torch.randperm(num_blocks * block_size)[:t].long()
    slots[::3] = -1  # padding tokens
    k_cache = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    return k, v, k_cache, v_cache, slots


def test_reference_matches_per_token_loop() -> None:
    k, v, k_cache, v_cache, slots = _inputs(7, 2, 8, 4, torch.float32)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expect_k[slot // 4, slot % 4] = k[t]
            expect_v[slot // 4, slot % 4] = v[t]
    write_kv_ref(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


@needs_triton
@pytest.mark.parametrize(
    ("t", "hkv", "d", "block_size", "dtype"),
    [(7, 2, 8, 4, torch.float32), (5, 1, 24, 16, torch.bfloat16), (9, 3, 16, 3, torch.float16)],
)
def test_triton_matches_reference(
    t: int, hkv: int, d: int, block_size: int, dtype: torch.dtype
) -> None:
    k, v, k_cache, v_cache, slots = _inputs(t, hkv, d, block_size, dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, v, ref_k, ref_v, slots)
    write_kv(k, v, k_cache, v_cache, slots, impl="triton")
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


@needs_triton
def test_triton_reads_k_v_views_of_fused_qkv() -> None:
    t, hq, hkv, d = 6, 4, 2, 8
    qkv = torch.randn(t, (hq + 2 * hkv) * d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    k_cache, v_cache = torch.zeros(3, 4, hkv, d), torch.zeros(3, 4, hkv, d)
    slots = torch.tensor([0, 5, -1, 11, 2, 7])
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, v, ref_k, ref_v, slots)
    write_kv(k, v, k_cache, v_cache, slots, impl="triton")
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
