"""Varlen causal attention over a paged KV cache (prefill chunks and decode steps mixed).

One call covers a batch of B sequences. Sequence b owns the queries
``q[query_start_loc[b]:query_start_loc[b+1]]`` (q_len_b of them); all ``seq_lens[b]`` of its
context tokens, the new ones included, are already in the cache, in the blocks listed by
``block_tables[b]``. Query i of sequence b sits at absolute position
``seq_lens[b] - q_len_b + i`` and attends to every position <= that one.

GQA: ``Hq % Hkv == 0`` and query head h reads kv head ``h // (Hq // Hkv)``.

The Triton path has two kernels behind this one signature: a split-K decode kernel, used when
every sequence has exactly one query (T == B), and a tiled prefill kernel otherwise.
"""

from __future__ import annotations

import torch

from kernels._dispatch import Impl, use_triton


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` cached tokens of one sequence, in order.

    # N blocks, S block size, Hkv kv heads, D head dim, L seq_len
    cache [N, S, Hkv, D], block_table [M] -> [L, Hkv, D]
    """
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    return cache[blocks].flatten(0, 1)[:seq_len]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Torch reference of :func:`paged_attention`: one sequence at a time, fp32 math.

    Used by the engine on CPU, so it reads the lengths on the host (a sync that is free there).
    """
    # T tokens, Hq query heads, Hkv kv heads, D head dim
    hq, hkv = q.shape[1], k_cache.shape[2]
    group = hq // hkv
    out = torch.empty_like(q)  # [T, Hq, D]
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        qb = q[q_start:q_end].float().transpose(0, 1)  # [Hq, q_len, D]
        # Repeat each kv head for its `group` query heads: [Hq, L, D].
        kb = gather_kv(k_cache, block_tables[b], seq_len).float().transpose(0, 1)
        vb = gather_kv(v_cache, block_tables[b], seq_len).float().transpose(0, 1)
        kb = kb.repeat_interleave(group, dim=0)
        vb = vb.repeat_interleave(group, dim=0)
        scores = torch.matmul(qb, kb.transpose(1, 2)) * scale  # [Hq, q_len, L]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)  # [q_len]
        k_pos = torch.arange(seq_len, device=q.device)  # [L]
        visible = k_pos[None, :] <= q_pos[:, None]  # [q_len, L]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.matmul(probs, vb).transpose(0, 1).to(q.dtype)
    return out


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> None:
    _, hq, d = q.shape
    assert k_cache.dim() == 4 and v_cache.shape == k_cache.shape, (k_cache.shape, v_cache.shape)
    hkv = k_cache.shape[2]
    assert k_cache.shape[3] == d, (k_cache.shape, q.shape)
    assert hq % hkv == 0, f"GQA needs Hq % Hkv == 0, got {hq=} {hkv=}"
    assert q.dtype == k_cache.dtype == v_cache.dtype, (q.dtype, k_cache.dtype)
    b = seq_lens.shape[0]
    assert block_tables.dim() == 2 and block_tables.shape[0] == b, block_tables.shape
    assert query_start_loc.shape == (b + 1,), (query_start_loc.shape, b)
    for name, x in (
        ("block_tables", block_tables),
        ("seq_lens", seq_lens),
        ("query_start_loc", query_start_loc),
    ):
        assert x.dtype == torch.int32, f"{name} must be int32, got {x.dtype}"


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    impl: Impl = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Causal paged attention; returns ``out [T, Hq, D]`` in q's dtype.

    q [T, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, M] int32;
    seq_lens [B] int32; query_start_loc [B+1] int32. Every sequence must have q_len >= 1 for
    the decode kernel to be chosen correctly (T == B then means one query each).
    ``num_splits`` (decode only) overrides the split-K factor.
    """
    _check(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    if not use_triton(q, impl):
        return paged_attention_ref(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale
        )
    if q.shape[0] == seq_lens.shape[0]:
        from kernels.triton_impl.attention_decode import paged_attention_decode

        return paged_attention_decode(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, num_splits
        )
    from kernels.triton_impl.attention_prefill import paged_attention_prefill

    return paged_attention_prefill(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale
    )
