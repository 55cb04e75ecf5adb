"""Per-request view of the KV block pool: prefix-cache hits, slots, and release."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.kv_cache.block import Block
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.hashing import extend_block_hashes
from engine.kv_cache.request import CacheableRequest


@dataclass
class _RequestBlocks:
    """What the manager holds for one admitted request."""

    blocks: list[Block]
    num_slots: int
    """Tokens with a KV slot: the cached prefix plus every token allocated since."""
    num_cached_tokens: int
    """Prompt tokens served from the prefix cache at admission."""
    num_registered_blocks: int
    """Leading blocks already registered in the prefix cache."""
    block_hashes: list[bytes] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    """``[b.block_id for b in blocks]``, kept beside them (read every step)."""


class KVCacheManager:
    """Allocates KV slots for requests and shares full blocks through the prefix cache.

    Scheduler flow for a new request: ``blocks, n = get_computed_blocks(req)``, then
    ``allocate_slots(req, len(req.token_ids) - n, blocks)``; each later step
    ``allocate_slots(req, num_new_tokens)``; after the forward pass
    ``cache_blocks(req, num_computed_tokens)``; at the end (finish, abort, preemption)
    ``free(request_id)``. Allocation is query/commit: a failed call changes nothing.
    """

    def __init__(self, block_size: int, num_blocks: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self._requests: dict[str, _RequestBlocks] = {}
        # Hash chains of requests not admitted yet (waiting ones retry every step).
        self._pending_hashes: dict[str, list[bytes]] = {}
        self.prefix_cache_queries = 0
        """Prompt tokens looked up in the prefix cache (counted once per admission)."""
        self.prefix_cache_hits = 0
        """Of those, tokens served from the cache."""

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def get_computed_blocks(self, req: CacheableRequest) -> tuple[list[Block], int]:
        """Longest chain of cached full blocks prefixing ``req``, and its token count.

        Never covers the whole prompt: the last token is always recomputed so the step
        yields its logits. Takes no references; pass the blocks to :meth:`allocate_slots`.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (len(req.token_ids) - 1) // self.block_size
        blocks = []
        for block_hash in self.full_block_hashes(req)[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def can_allocate_slots(
        self, req: CacheableRequest, num_new_tokens: int, computed_blocks: Sequence[Block] = ()
    ) -> bool:
        """Whether :meth:`allocate_slots` would succeed now."""
        return self._num_blocks_to_take(req, num_new_tokens, computed_blocks) is not None

    def allocate_slots(
        self, req: CacheableRequest, num_new_tokens: int, computed_blocks: Sequence[Block] = ()
    ) -> list[Block] | None:
        """Give ``num_new_tokens`` more tokens of ``req`` a KV slot.

        ``computed_blocks`` (from :meth:`get_computed_blocks`) only on the first call for
        a request. Returns the newly allocated blocks (maybe none), or None when the pool
        is short, in which case nothing changed.
        """
        state = self._requests.get(req.request_id)
        if (
            state is not None
            and not computed_blocks
            and state.num_slots + num_new_tokens <= len(state.blocks) * self.block_size
        ):  # fits the blocks held (most decode steps): nothing to take
            state.num_slots += num_new_tokens
            return []
        num_blocks = self._num_blocks_to_take(req, num_new_tokens, computed_blocks)
        if num_blocks is None:
            return None
        if state is None:
            state = self._admit(req, computed_blocks)
        new_blocks = self.pool.allocate(num_blocks)
        state.blocks.extend(new_blocks)
        state.block_ids.extend(block.block_id for block in new_blocks)
        state.num_slots += num_new_tokens
        return new_blocks

    def cache_blocks(self, req: CacheableRequest, num_computed_tokens: int) -> None:
        """Register the full blocks among ``req``'s first ``num_computed_tokens`` tokens.

        Call after the forward pass wrote their KV; generated tokens count too.
        """
        state = self._requests[req.request_id]
        if not self.enable_prefix_caching:
            return
        if min(num_computed_tokens, state.num_slots) // self.block_size <= (
            state.num_registered_blocks
        ):  # no new full block (most steps): skip building `req.token_ids`
            return
        num_tokens = min(num_computed_tokens, state.num_slots, len(req.token_ids))
        num_full = num_tokens // self.block_size
        if num_full <= state.num_registered_blocks:
            return
        start = state.num_registered_blocks
        hashes = self.full_block_hashes(req)
        self.pool.cache_full_blocks(state.blocks[start:num_full], hashes[start:num_full])
        state.num_registered_blocks = num_full

    def free(self, request_id: str) -> None:
        """Release every block of the request; unknown or already freed ids are a no-op."""
        self._pending_hashes.pop(request_id, None)
        state = self._requests.pop(request_id, None)
        if state is not None:
            self.pool.free(reversed(state.blocks))

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table, in token order."""
        return list(self._requests[request_id].block_ids)

    def num_cached_tokens(self, request_id: str) -> int:
        """Prompt tokens the request got from the prefix cache (``cached_tokens`` in usage)."""
        return self._requests[request_id].num_cached_tokens

    def slot_mapping(self, request_id: str, start: int, end: int) -> list[int]:
        """KV slot (``block_id * block_size + offset``) of each token position in [start, end)."""
        state = self._requests[request_id]
        if start < 0 or end > state.num_slots:
            raise IndexError(f"positions [{start}, {end}) outside {state.num_slots} slots")
        size = self.block_size
        return [state.blocks[pos // size].block_id * size + pos % size for pos in range(start, end)]

    def block_hashes(self, req: CacheableRequest) -> list[bytes]:
        """Hashes of the leading blocks this cache already holds for ``req``.

        For disaggregation: decode sends these so prefill transfers only the rest.
        """
        blocks, _ = self.get_computed_blocks(req)
        return [block.block_hash for block in blocks if block.block_hash is not None]

    def full_block_hashes(self, req: CacheableRequest) -> list[bytes]:
        """Chained hashes of every full block of ``req.token_ids`` (memoised, grows)."""
        state = self._requests.get(req.request_id)
        if state is not None:
            hashes = state.block_hashes
        else:
            hashes = self._pending_hashes.setdefault(req.request_id, [])
        extend_block_hashes(hashes, req.token_ids, self.block_size, req.media_spans, req.cache_salt)
        return hashes

    def _num_blocks_to_take(
        self, req: CacheableRequest, num_new_tokens: int, computed_blocks: Sequence[Block]
    ) -> int | None:
        """New blocks ``allocate_slots`` needs, or None if the pool cannot supply them."""
        state = self._requests.get(req.request_id)
        if state is not None and computed_blocks:
            raise ValueError(f"request {req.request_id} is admitted: no computed blocks")
        held = state.blocks if state is not None else computed_blocks
        num_slots = state.num_slots if state is not None else len(computed_blocks) * self.block_size
        num_needed = -(-(num_slots + num_new_tokens) // self.block_size)
        num_blocks = max(0, num_needed - len(held))
        # A hit on a free cached block takes it out of the free queue too.
        num_revived = sum(1 for block in computed_blocks if block.ref_cnt == 0)
        if not self.pool.can_allocate(num_blocks + num_revived):
            return None
        return num_blocks

    def _admit(self, req: CacheableRequest, computed_blocks: Sequence[Block]) -> _RequestBlocks:
        self.pool.touch(computed_blocks)
        num_cached_tokens = len(computed_blocks) * self.block_size
        state = _RequestBlocks(
            blocks=list(computed_blocks),
            num_slots=num_cached_tokens,
            num_cached_tokens=num_cached_tokens,
            num_registered_blocks=len(computed_blocks),
            block_hashes=self._pending_hashes.pop(req.request_id, []),
            block_ids=[block.block_id for block in computed_blocks],
        )
        self._requests[req.request_id] = state
        self.prefix_cache_queries += len(req.token_ids)
        self.prefix_cache_hits += num_cached_tokens
        return state
