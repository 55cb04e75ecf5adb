"""Self-attention over the paged KV cache.

The engine hands every forward one `AttentionMetadata` for the whole flat batch (prefill
chunks and decode steps mixed); each attention layer writes the new K/V into its cache and
attends over the cached context. The kernels (Triton on GPU, torch reference on CPU) live
in `kernels/`; this layer only reshapes and calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.kv_cache import write_kv
from kernels.paged_attention import paged_attention

KVCache = tuple[torch.Tensor, torch.Tensor]
"""(k_cache, v_cache), each `[num_blocks, block_size, num_kv_heads, head_dim]`."""


@dataclass
class AttentionMetadata:
    """Where the T tokens of one step go in the cache and what each attends to.

    B sequences, T tokens in all. Sequence b owns queries
    `query_start_loc[b]:query_start_loc[b+1]` and has `seq_lens[b]` tokens of context
    (the new ones included) in the blocks `block_tables[b]`.
    """

    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset; < 0 = skip
    block_tables: torch.Tensor  # [B, M] int32
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        kv_written: bool = False,
    ) -> torch.Tensor:
        """q `[T, Hq, D]`, k/v `[T, Hkv, D]` -> `[T, Hq, D]`. `kv_written`: the caller already
        put k and v in the cache (fused with the rotary embedding)."""
        k_cache, v_cache = kv_cache
        if not kv_written:
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            self.scale,
        )
