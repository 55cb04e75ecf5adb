"""Write new keys and values into one layer's paged KV cache.

Layout (shared with the engine and with paged attention):
``k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]``, and token t goes to
flat slot ``slot_mapping[t] = block_id * block_size + offset``. A negative slot marks a padding
token (e.g. a CUDA-graph batch bucket larger than the real batch) and is skipped.
"""

from __future__ import annotations

import torch

from kernels._dispatch import Impl, use_triton


def write_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Torch reference of :func:`write_kv` (in place)."""
    # T tokens, Hkv kv heads, D head dim, N blocks, S block size
    num_blocks, block_size, hkv, d = k_cache.shape
    keep = slot_mapping >= 0  # [T]
    slots = slot_mapping[keep]
    # Viewing the cache as [N*S, Hkv, D] makes a slot a plain row index.
    k_cache.view(num_blocks * block_size, hkv, d)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, hkv, d)[slots] = v[keep].to(v_cache.dtype)


def _check(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    t, hkv, d = k.shape
    assert v.shape == k.shape, (v.shape, k.shape)
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (hkv, d), (k_cache.shape, k.shape)
    assert v_cache.shape == k_cache.shape, (v_cache.shape, k_cache.shape)
    assert k.dtype == v.dtype == k_cache.dtype == v_cache.dtype, "k, v and caches share a dtype"
    assert slot_mapping.shape == (t,) and slot_mapping.dtype == torch.int64, slot_mapping.dtype
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    impl: Impl = None,
) -> None:
    """Scatter ``k, v [T, Hkv, D]`` into ``k_cache, v_cache`` at ``slot_mapping [T]`` (int64);
    slots < 0 are skipped. In place; nothing is returned."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    if not use_triton(k, impl):
        write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
        return
    from kernels.triton_impl.kv_cache import write_kv_triton

    write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
