"""Paged KV cache: a block pool with ref counts, LRU eviction and a multimodal prefix cache.

``BlockPool`` owns the blocks; ``KVCacheManager`` maps requests onto them. Both are pure
Python bookkeeping: the KV tensors live with the model runner, indexed by block id.
"""

from __future__ import annotations

from engine.kv_cache.block import Block, FreeBlockQueue
from engine.kv_cache.block_pool import NULL_BLOCK_ID, BlockPool
from engine.kv_cache.hashing import block_extra_keys, extend_block_hashes, hash_block
from engine.kv_cache.manager import KVCacheManager
from engine.kv_cache.request import CacheableRequest, KVCacheRequest, MediaSpan

__all__ = [
    "NULL_BLOCK_ID",
    "Block",
    "BlockPool",
    "CacheableRequest",
    "FreeBlockQueue",
    "KVCacheManager",
    "KVCacheRequest",
    "MediaSpan",
    "block_extra_keys",
    "extend_block_hashes",
    "hash_block",
]
