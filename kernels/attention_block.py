"""A decoder layer's attention half for one decode token, in one launch.

``attention_block`` = input RMSNorm (+ residual add) -> qkv projection -> rotary -> K/V cache
write -> paged decode attention -> ``o_proj``. At batch 1 each of those is a small kernel
whose ramp-up and drain cost more than its work (bench/RESULTS.md); on the GPU they run as
one persistent launch with grid barriers between the phases
(``kernels.triton_impl.attention_block``), when ``FUSED`` is on (off by default: measured no
faster inside the step). Elsewhere, and always on CPU, the same chain of separate kernels
runs, which is also the reference.
"""

from __future__ import annotations

import torch

from kernels._dispatch import Impl, use_triton
from kernels.gemv import linear, qkv_rope_linear
from kernels.paged_attention import paged_attention
from kernels.rms_norm import rms_norm

FUSED = False
"""Take the one-launch kernel where it applies (read when a step is traced, so a CUDA graph
keeps the path it was captured with; benchmarks flip it between captures). Off: on an H100
it runs a 28B attention half in 22.4 us against 25.7 for the chain of kernels when blocks
follow each other (bench/attention_block_bench.py), but inside the decode step the chain
already overlaps its hops with the MoE kernels around it under PDL, and the b1 step replays
in 3.076 ms with it against 3.073 without (bench/decode_step_bench.py, RESULTS.md). Its grid
barrier also needs every program resident at once, which a GPU shared through MPS with an
SM limit would not give."""


def attention_block_ref(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    qkv: tuple[torch.Tensor, torch.Tensor | None],
    o: tuple[torch.Tensor, torch.Tensor | None],
    num_heads: int,
    num_kv_heads: int,
    rope: tuple[torch.Tensor, torch.Tensor],
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    impl: Impl = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain of separate kernels (torch references by default)."""
    # T tokens, Hq query heads, Dh head dim
    slots, block_tables, seq_lens, query_start_loc = meta
    x, res = rms_norm(h, norm_weight, eps, residual, impl=impl)
    out = qkv_rope_linear(
        x, *qkv, num_heads, num_kv_heads, rope, (*kv_cache, slots), impl=impl
    )  # [T, (Hq + 2 Hkv) Dh]
    d = rope[0].shape[1]
    q = out[:, : num_heads * d].reshape(-1, num_heads, d)
    att = paged_attention(
        q, *kv_cache, block_tables, seq_lens, query_start_loc, scale, impl=impl
    )  # [T, Hq, Dh]
    return linear(att.flatten(1), *o, impl=impl), res


def use_attention_block(h: torch.Tensor, qkv_weight: torch.Tensor, impl: Impl = None) -> bool:
    """One token, weights in h's dtype, and the kernel asked for (or the default on a GPU)."""
    if impl is None and not FUSED:
        return False
    if h.dim() != 2 or h.shape[0] != 1 or h.dtype != qkv_weight.dtype:
        return False
    return use_triton(h, impl)


def attention_block(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    qkv: tuple[torch.Tensor, torch.Tensor | None],
    o: tuple[torch.Tensor, torch.Tensor | None],
    num_heads: int,
    num_kv_heads: int,
    rope: tuple[torch.Tensor, torch.Tensor],
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    impl: Impl = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_proj output, residual stream) of a pre-norm attention half.

    h, residual ``[T, D]`` (residual None at the first layer: the stream is h); qkv =
    (weight ``[(Hq + 2 Hkv) Dh, D]`` stacked q, k, v, bias or None); o = (weight
    ``[D, Hq Dh]``, bias or None); rope = ``TextRotary.step_table(positions)``; kv_cache =
    (k_cache, v_cache) ``[blocks, block size, Hkv, Dh]``; meta = (slot_mapping ``[T]`` int64,
    block_tables ``[T, M]``, seq_lens ``[T]``, query_start_loc ``[T + 1]``, all int32), one
    query per sequence. The new k and v land in the cache. Returns ``o_proj(attention)`` and
    ``h + residual`` (h itself without residual)."""
    # T tokens, D hidden, Hq / Hkv heads, Dh head dim
    qkv_weight, qkv_bias = qkv
    o_weight, o_bias = o
    table, rows = rope
    k_cache, v_cache = kv_cache
    slots, block_tables, seq_lens, query_start_loc = meta
    d = table.shape[1]
    hidden = h.shape[1]
    assert qkv_weight.shape == ((num_heads + 2 * num_kv_heads) * d, hidden), qkv_weight.shape
    assert o_weight.shape == (hidden, num_heads * d), o_weight.shape
    assert norm_weight.shape == (hidden,), norm_weight.shape
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    if residual is not None:
        assert residual.shape == h.shape and residual.dtype == h.dtype, residual.shape
    sync = None
    if use_attention_block(h, qkv_weight, impl) and _fits(h, qkv, o, rope, kv_cache, meta):
        from kernels.triton_impl.attention_block import sync_buffer

        sync = sync_buffer(h.device)
    if sync is None:
        return attention_block_ref(
            h, residual, norm_weight, eps, qkv, o, num_heads, num_kv_heads, rope, kv_cache,
            meta, scale, impl=impl,
        )  # fmt: skip
    from kernels.triton_impl.attention_block import attention_block_triton

    return attention_block_triton(
        h, residual, norm_weight, eps, qkv_weight, qkv_bias, o_weight, o_bias, num_heads,
        num_kv_heads, table, rows, k_cache, v_cache, slots, block_tables, seq_lens,
        query_start_loc, scale, sync,
    )  # fmt: skip


def _fits(h, qkv, o, rope, kv_cache, meta) -> bool:
    """The layouts the kernel reads: contiguous rows, int32 metadata, one sequence."""
    from kernels.triton_impl.attention_block import BLOCK_N_O, BLOCK_N_QKV

    table, rows = rope
    k_cache, v_cache = kv_cache
    slots, block_tables, seq_lens, query_start_loc = meta
    d = table.shape[1]
    tensors = (h, *qkv, *o, table, rows, k_cache, v_cache, slots, seq_lens, query_start_loc)
    return (
        all(x is None or x.is_contiguous() for x in tensors)
        and block_tables.shape[0] == 1
        and block_tables.stride(1) == 1
        and k_cache.dtype == v_cache.dtype == h.dtype
        and table.dtype == torch.float32
        and rows.dtype == slots.dtype == torch.int64
        and d % BLOCK_N_QKV == 0
        and h.shape[1] % BLOCK_N_O == 0
    )
