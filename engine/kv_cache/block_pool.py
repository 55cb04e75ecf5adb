"""The paged KV block pool: allocation, ref counts, and the prefix-cache hash map."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from engine.kv_cache.block import Block, FreeBlockQueue

NULL_BLOCK_ID = 0
"""Block 0 is reserved and never allocated: padded slots (CUDA-graph batch padding,
dummy runs) point at it so their KV writes cannot corrupt a real request's blocks."""


class BlockPool:
    """All KV blocks of one process.

    Every usable block is either *used* (``ref_cnt > 0``, held by requests) or *free*
    (in the free queue). A free block may still carry a ``block_hash``: it stays in the
    prefix cache and can be hit (:meth:`touch`) until :meth:`allocate` evicts it, head of
    the free queue first, so eviction is LRU over free cached blocks.

    Capacity is ``num_blocks - 1``: block 0 is the null block (see ``NULL_BLOCK_ID``).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self._free_queue = FreeBlockQueue(self.blocks[NULL_BLOCK_ID + 1 :])
        # Hash -> the one block holding that content. Only full blocks are registered.
        self._cached_blocks: dict[bytes, Block] = {}

    @property
    def num_total_blocks(self) -> int:
        """Usable blocks (the null block excluded)."""
        return len(self.blocks) - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ``ref_cnt == 0``, cached or not: all can be allocated."""
        return len(self._free_queue)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one request."""
        return self.num_total_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, used or free."""
        return len(self._cached_blocks)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks in use, 0.0 to 1.0."""
        return self.num_used_blocks / self.num_total_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[Block]:
        """Take ``num_blocks`` blocks (ref_cnt 1), evicting the least recently freed.

        Raises ``ValueError`` when fewer are free; check :meth:`can_allocate` first.
        """
        if not self.can_allocate(num_blocks):
            raise ValueError(f"cannot allocate {num_blocks} blocks, {self.num_free_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            block = self._free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the free queue.

        A cached block goes to the tail (most recently used) and keeps its hash. A block
        with no hash goes to the head: nothing can hit it, so it should be reused first.
        Callers pass a request's blocks in reverse so its tail is evicted before its
        prefix, which more requests share.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than taken")
            block.ref_cnt -= 1
            if block.ref_cnt > 0:
                continue
            if block.block_hash is None:
                self._free_queue.appendleft(block)
            else:
                self._free_queue.append(block)

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take one more reference on each block (a prefix-cache hit)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._free_queue.remove(block)
            block.ref_cnt += 1

    def cache_full_blocks(self, blocks: Sequence[Block], block_hashes: Sequence[bytes]) -> None:
        """Register full ``blocks`` under ``block_hashes`` (pairwise) in the prefix cache.

        If another block already holds the same content (two requests computed it at
        once), the first one stays the cache entry and this block stays unhashed, so the
        hash map never has two candidates.
        """
        if not self.enable_prefix_caching:
            return
        if len(blocks) != len(block_hashes):
            raise ValueError(f"{len(blocks)} blocks but {len(block_hashes)} hashes")
        for block, block_hash in zip(blocks, block_hashes, strict=True):
            if block.block_hash is not None:
                if block.block_hash != block_hash:
                    raise ValueError(f"block {block.block_id} is cached under another hash")
                continue
            if block_hash in self._cached_blocks:
                continue
            block.block_hash = block_hash
            self._cached_blocks[block_hash] = block

    def lookup(self, block_hash: bytes) -> Block | None:
        """The cached block holding ``block_hash``, used or free, or None."""
        if not self.enable_prefix_caching:
            return None
        return self._cached_blocks.get(block_hash)

    def cached_items(self) -> Iterator[tuple[bytes, Block]]:
        """(hash, block) pairs of the prefix cache, for checks and debugging."""
        return iter(list(self._cached_blocks.items()))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (e.g. after a weight update); only when all are free."""
        if self.num_used_blocks > 0:
            return False
        for block in self._cached_blocks.values():
            block.block_hash = None
        self._cached_blocks.clear()
        return True

    def _evict(self, block: Block) -> None:
        if block.block_hash is None:
            return
        if self._cached_blocks.get(block.block_hash) is block:
            del self._cached_blocks[block.block_hash]
        block.block_hash = None
