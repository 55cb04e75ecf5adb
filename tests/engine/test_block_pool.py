"""BlockPool, FreeBlockQueue and block hashing."""

from __future__ import annotations

import pytest

from engine.kv_cache import (
    NULL_BLOCK_ID,
    Block,
    BlockPool,
    FreeBlockQueue,
    MediaSpan,
    block_extra_keys,
    extend_block_hashes,
    hash_block,
)


def ids(blocks: list[Block]) -> list[int]:
    return [block.block_id for block in blocks]


# FreeBlockQueue


def test_free_queue_removes_from_the_middle_and_keeps_order() -> None:
    blocks = [Block(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    assert len(queue) == 4
    assert ids(list(queue)) == [0, 1, 3, 4]
    queue.appendleft(blocks[2])
    assert ids(list(queue)) == [2, 0, 1, 3, 4]
    assert queue.popleft() is blocks[2]
    assert not blocks[2].is_queued


def test_free_queue_rejects_double_insert_and_foreign_remove() -> None:
    block = Block(1)
    queue = FreeBlockQueue([block])
    with pytest.raises(ValueError):
        queue.append(block)
    with pytest.raises(ValueError):
        queue.remove(Block(2))
    queue.popleft()
    with pytest.raises(IndexError):
        queue.popleft()


# BlockPool accounting


def test_null_block_is_reserved() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    assert pool.num_total_blocks == 3
    allocated = pool.allocate(3)
    assert NULL_BLOCK_ID not in ids(allocated)
    assert pool.null_block.block_id == NULL_BLOCK_ID
    with pytest.raises(ValueError):
        BlockPool(num_blocks=1, block_size=2)


def test_allocate_and_free_accounting() -> None:
    pool = BlockPool(num_blocks=9, block_size=4)
    assert (pool.num_free_blocks, pool.num_used_blocks) == (8, 0)
    blocks = pool.allocate(3)
    assert all(block.ref_cnt == 1 for block in blocks)
    assert (pool.num_free_blocks, pool.num_used_blocks) == (5, 3)
    assert pool.usage == pytest.approx(3 / 8)
    assert pool.can_allocate(5) and not pool.can_allocate(6)
    with pytest.raises(ValueError):
        pool.allocate(6)
    assert pool.num_free_blocks == 5  # failed allocate took nothing
    pool.free(blocks)
    assert (pool.num_free_blocks, pool.num_used_blocks) == (8, 0)
    with pytest.raises(ValueError):
        pool.free(blocks[:1])


def test_shared_block_is_free_only_after_last_reference() -> None:
    pool = BlockPool(num_blocks=4, block_size=4)
    [block] = pool.allocate(1)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free([block])
    assert pool.num_used_blocks == 1
    pool.free([block])
    assert pool.num_used_blocks == 0


# Prefix cache and eviction


def test_free_cached_block_can_be_hit_until_evicted() -> None:
    pool = BlockPool(num_blocks=3, block_size=4)
    [block] = pool.allocate(1)
    pool.cache_full_blocks([block], [b"h"])
    pool.free([block])
    assert pool.lookup(b"h") is block and block.block_hash == b"h"
    pool.touch([pool.lookup(b"h")])  # type: ignore[list-item]
    assert block.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.free([block])
    pool.allocate(2)  # needs every free block: the cached one is evicted
    assert pool.lookup(b"h") is None
    assert block.block_hash is None


def test_eviction_is_lru_over_free_cached_blocks() -> None:
    pool = BlockPool(num_blocks=5, block_size=4)
    a, b, c, d = pool.allocate(4)
    pool.cache_full_blocks([a, b, c], [b"a", b"b", b"c"])
    pool.free([b])
    pool.free([a])
    pool.free([c])
    pool.free([d])  # uncached: nothing can hit it, so it is reused first
    assert ids(pool.allocate(1)) == [d.block_id]
    assert ids(pool.allocate(1)) == [b.block_id]
    assert pool.lookup(b"b") is None and pool.lookup(b"a") is a
    # A hit followed by a free moves the block to the tail: recently used again.
    pool.touch([a])
    pool.free([a])
    assert ids(pool.allocate(1)) == [c.block_id]


def test_duplicate_content_keeps_first_cache_entry() -> None:
    pool = BlockPool(num_blocks=4, block_size=4)
    first, second = pool.allocate(2)
    pool.cache_full_blocks([first], [b"x"])
    pool.cache_full_blocks([second], [b"x"])
    assert pool.lookup(b"x") is first and second.block_hash is None
    with pytest.raises(ValueError):
        pool.cache_full_blocks([first], [b"y"])


def test_prefix_caching_disabled_never_hits() -> None:
    pool = BlockPool(num_blocks=4, block_size=4, enable_prefix_caching=False)
    [block] = pool.allocate(1)
    pool.cache_full_blocks([block], [b"h"])
    assert pool.lookup(b"h") is None and block.block_hash is None


def test_reset_prefix_cache_only_when_idle() -> None:
    pool = BlockPool(num_blocks=4, block_size=4)
    [block] = pool.allocate(1)
    pool.cache_full_blocks([block], [b"h"])
    assert not pool.reset_prefix_cache()
    pool.free([block])
    assert pool.reset_prefix_cache()
    assert pool.lookup(b"h") is None and pool.num_cached_blocks == 0


# Hashing


def test_hash_block_is_stable_across_runs() -> None:
    # Fixed digests: a change of encoding must bump the domain tag, not drift silently.
    root = hash_block(None, [1, 2, 3, 4], ())
    assert root.hex() == "534f10edee8e5939433d2c1357bda7820a0c3966875ec1e13583cde9f1c6eb6a"
    child = hash_block(root, [5, 6, 7, 8], (("salt", "t1"), "img-a"))
    assert child.hex() == "b77a825ae09b605495b323e523149005798583b1ca537cb2dcaf1353038c2392"


def test_hash_block_depends_on_every_input() -> None:
    base = hash_block(None, [1, 2], ("a",))
    assert len(base) == 32
    assert hash_block(None, [1, 2], ("a",)) == base
    variants = [
        hash_block(b"p" * 32, [1, 2], ("a",)),
        hash_block(None, [2, 1], ("a",)),
        hash_block(None, [1, 2], ("b",)),
        hash_block(None, [1, 2], ()),
        hash_block(None, [1, 2], ("a", "")),
        hash_block(None, [1, 2], (b"a",)),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # Length prefixes keep the encoding injective.
    assert hash_block(None, [1], ("ab",)) != hash_block(None, [1], ("a", "b"))


def test_extra_keys_are_media_overlapping_the_block() -> None:
    spans = [MediaSpan(6, 4, "img-b"), MediaSpan(2, 3, "img-a")]
    assert block_extra_keys(0, 4, spans) == ("img-a",)
    assert block_extra_keys(4, 8, spans) == ("img-a", "img-b")
    assert block_extra_keys(8, 12, spans) == ("img-b",)
    assert block_extra_keys(12, 16, spans) == ()
    assert block_extra_keys(0, 4, spans, cache_salt="t") == (("salt", "t"), "img-a")
    assert block_extra_keys(4, 8, [], cache_salt="t") == ()


def test_extend_block_hashes_is_incremental_and_chained() -> None:
    tokens = list(range(10))
    hashes: list[bytes] = []
    extend_block_hashes(hashes, tokens[:5], block_size=4)
    assert len(hashes) == 1
    extend_block_hashes(hashes, tokens, block_size=4)
    assert hashes == [
        hash_block(None, tokens[0:4], ()),
        hash_block(hashes[0], tokens[4:8], ()),
    ]
    salted: list[bytes] = []
    extend_block_hashes(salted, tokens, block_size=4, cache_salt="tenant")
    assert salted[0] != hashes[0] and salted[1] != hashes[1]  # salt flows down the chain
