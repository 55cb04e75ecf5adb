"""KVCacheManager: per-request allocation and the multimodal prefix cache."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from engine.kv_cache import KVCacheManager, KVCacheRequest, MediaSpan

BS = 4  # block size


def make_manager(num_blocks: int = 17, enable_prefix_caching: bool = True) -> KVCacheManager:
    return KVCacheManager(BS, num_blocks, enable_prefix_caching)


def admit(manager: KVCacheManager, req: KVCacheRequest) -> int:
    """Admit ``req`` for its whole prompt, compute and cache it; return its cached tokens."""
    blocks, num_cached = manager.get_computed_blocks(req)
    assert manager.allocate_slots(req, len(req.token_ids) - num_cached, blocks) is not None
    manager.cache_blocks(req, len(req.token_ids))
    return num_cached


def test_allocation_and_free_accounting() -> None:
    manager = make_manager(num_blocks=9)
    req = KVCacheRequest("a", list(range(10)))
    new_blocks = manager.allocate_slots(req, 10)
    assert new_blocks is not None and len(new_blocks) == 3
    assert manager.block_ids("a") == [b.block_id for b in new_blocks]
    assert (manager.num_used_blocks, manager.num_free_blocks) == (3, 5)
    assert manager.allocate_slots(req, 2) == []  # fits the partial last block
    assert len(manager.allocate_slots(req, 1) or []) == 1
    manager.free("a")
    manager.free("a")  # idempotent
    assert (manager.num_used_blocks, manager.num_free_blocks) == (0, 8)


def test_slot_mapping() -> None:
    manager = make_manager()
    manager.allocate_slots(KVCacheRequest("a", list(range(6))), 6)
    first, second = manager.block_ids("a")
    expected = [first * BS + 2, first * BS + 3, second * BS, second * BS + 1]
    assert manager.slot_mapping("a", 2, 6) == expected
    with pytest.raises(IndexError):
        manager.slot_mapping("a", 0, 7)


def test_hit_after_free_and_counters() -> None:
    manager = make_manager()
    prompt = list(range(9))
    assert admit(manager, KVCacheRequest("a", prompt)) == 0
    first_ids = manager.block_ids("a")
    manager.free("a")
    assert manager.num_used_blocks == 0
    req = KVCacheRequest("b", prompt)
    assert admit(manager, req) == 8
    assert manager.block_ids("b")[:2] == first_ids[:2]
    assert manager.num_cached_tokens("b") == 8
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (18, 8)
    assert manager.block_hashes(req) == manager.full_block_hashes(req)[:2]


def test_shared_prefix_shares_blocks() -> None:
    manager = make_manager()
    admit(manager, KVCacheRequest("a", [*range(8), 100, 101]))
    admit(manager, KVCacheRequest("b", [*range(8), 200]))
    shared = manager.block_ids("a")[:2]
    assert manager.block_ids("b")[:2] == shared
    assert all(manager.pool.blocks[i].ref_cnt == 2 for i in shared)
    assert manager.block_ids("a")[2] != manager.block_ids("b")[2]
    manager.free("a")
    assert all(manager.pool.blocks[i].ref_cnt == 1 for i in shared)


def test_different_media_behind_same_tokens_never_share() -> None:
    manager = make_manager()
    tokens = [1, 7, 7, 7, 7, 7, 7, 2, 3]  # 7 = image placeholder
    admit(manager, KVCacheRequest("a", tokens, [MediaSpan(1, 6, "cat")]))
    assert admit(manager, KVCacheRequest("b", tokens, [MediaSpan(1, 6, "dog")])) == 0
    assert admit(manager, KVCacheRequest("c", tokens, [MediaSpan(1, 6, "cat")])) == 8


def test_cache_salt_isolates_tenants() -> None:
    manager = make_manager()
    tokens = list(range(9))
    admit(manager, KVCacheRequest("a", tokens, cache_salt="tenant-1"))
    assert admit(manager, KVCacheRequest("b", tokens, cache_salt="tenant-2")) == 0
    assert admit(manager, KVCacheRequest("c", tokens)) == 0
    assert admit(manager, KVCacheRequest("d", tokens, cache_salt="tenant-1")) == 8


def test_partial_block_never_cached_and_last_token_recomputed() -> None:
    manager = make_manager()
    admit(manager, KVCacheRequest("a", list(range(6))))
    assert manager.pool.num_cached_blocks == 1  # the 2-token tail is not cached
    assert admit(manager, KVCacheRequest("b", list(range(7)))) == 4
    # A prompt of exactly two cached blocks still recomputes its last block.
    admit(manager, KVCacheRequest("c", list(range(8))))
    assert manager.get_computed_blocks(KVCacheRequest("d", list(range(8))))[1] == 4
    assert manager.get_computed_blocks(KVCacheRequest("e", list(range(9))))[1] == 8


def test_generated_tokens_are_cached() -> None:
    manager = make_manager()
    req = KVCacheRequest("a", list(range(3)))
    admit(manager, req)
    for token in (50, 51, 52):
        req.token_ids.append(token)
        assert manager.allocate_slots(req, 1) is not None
        manager.cache_blocks(req, len(req.token_ids) - 1)  # the new token's KV comes next step
    manager.cache_blocks(req, len(req.token_ids))
    assert admit(manager, KVCacheRequest("b", [*req.token_ids, 9])) == 4


def test_cache_disabled_never_hits() -> None:
    manager = make_manager(enable_prefix_caching=False)
    admit(manager, KVCacheRequest("a", list(range(9))))
    manager.free("a")
    assert admit(manager, KVCacheRequest("b", list(range(9)))) == 0
    assert manager.pool.num_cached_blocks == 0
    assert manager.block_hashes(KVCacheRequest("c", list(range(9)))) == []


def test_failed_allocate_changes_nothing() -> None:
    manager = make_manager(num_blocks=5)  # 4 usable
    admit(manager, KVCacheRequest("a", list(range(9))))  # 3 blocks
    manager.free("a")  # all free, 2 cached
    req = KVCacheRequest("b", list(range(9)))
    blocks, num_cached = manager.get_computed_blocks(req)
    assert num_cached == 8
    # 8 cached + 9 new slots = 5 blocks: 3 new plus 2 hits revived from the free queue > 4.
    assert not manager.can_allocate_slots(req, 9, blocks)
    assert manager.allocate_slots(req, 9, blocks) is None
    assert all(block.ref_cnt == 0 for block in blocks)
    assert (manager.num_used_blocks, manager.pool.num_cached_blocks) == (0, 2)
    assert manager.prefix_cache_queries == 9
    with pytest.raises(KeyError):
        manager.block_ids("b")
    assert manager.allocate_slots(req, 1, blocks) is not None
    assert manager.num_used_blocks == 3


def test_abort_before_admission_leaves_nothing() -> None:
    manager = make_manager()
    req = KVCacheRequest("a", list(range(9)))
    manager.get_computed_blocks(req)
    manager.free("a")
    assert manager.num_used_blocks == 0


# Property-based


class KVCacheMachine(RuleBasedStateMachine):
    """Random request lifecycles against a model of which blocks each request holds."""

    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.manager = KVCacheManager(BS, num_blocks=8, enable_prefix_caching=True)
        self.live: dict[str, KVCacheRequest] = {}
        self.next_id = 0

    @rule(
        target=requests,
        prefix=st.sampled_from([(), (1, 2, 3, 4), (1, 2, 3, 4, 5, 6, 7, 8)]),
        suffix=st.lists(st.integers(0, 3), min_size=1, max_size=10),
        image=st.sampled_from([None, "cat", "dog"]),
    )
    def add_request(self, prefix: tuple[int, ...], suffix: list[int], image: str | None) -> str:
        request_id = f"r{self.next_id}"
        self.next_id += 1
        spans = [MediaSpan(1, 3, image)] if image and len(prefix) + len(suffix) > 4 else []
        self._admit(KVCacheRequest(request_id, [*prefix, *suffix], spans))
        return request_id

    @rule(num_left=st.integers(0, 2), then=st.sampled_from([(), (5,), (9, 9, 9, 9, 9)]))
    def squeeze(self, num_left: int, then: tuple[int, ...]) -> None:
        """Fill the pool but ``num_left`` blocks, admit a request reusing the shared prefix,
        then drop the filler: reaches the tight pools where hits on free blocks matter."""
        filler_id = f"filler{self.next_id}"
        self.next_id += 1
        num_blocks = max(1, self.manager.num_free_blocks - num_left)
        self._admit(KVCacheRequest(filler_id, [1000 + self.next_id] * num_blocks * BS))
        self.add_request((1, 2, 3, 4, 5, 6, 7, 8), list(then), None)
        self.manager.free(filler_id)
        self.live.pop(filler_id, None)

    def _admit(self, req: KVCacheRequest) -> None:
        request_id = req.request_id
        blocks, num_cached = self.manager.get_computed_blocks(req)
        assert num_cached < len(req.token_ids)
        used_before = self.manager.num_used_blocks
        # Spec: admission fits iff the free queue covers new blocks plus revived hits.
        num_revived = sum(block.ref_cnt == 0 for block in blocks)
        num_new = -(-len(req.token_ids) // BS) - len(blocks)
        fits = num_new + num_revived <= self.manager.num_free_blocks
        assert self.manager.can_allocate_slots(req, len(req.token_ids) - num_cached, blocks) == fits
        event("prefix hit" if num_cached else "prefix miss")
        if num_revived:
            event("hit on a free cached block")
        if self.manager.allocate_slots(req, len(req.token_ids) - num_cached, blocks) is None:
            event("admission refused")
            assert self.manager.num_used_blocks == used_before
            self.manager.free(request_id)
        else:
            self.live[request_id] = req

    @rule(request_id=requests)
    def preempt(self, request_id: str) -> None:
        """Preemption by recompute: release everything, then admit the tokens so far."""
        req = self.live.pop(request_id, None)
        if req is not None:
            self.manager.free(request_id)
            self._admit(req)

    @rule(request_id=requests, token=st.integers(0, 3))
    def decode(self, request_id: str, token: int) -> None:
        req = self.live.get(request_id)
        if req is None:
            return
        req.token_ids.append(token)
        if self.manager.allocate_slots(req, 1) is None:
            req.token_ids.pop()

    @rule(request_id=requests)
    def cache(self, request_id: str) -> None:
        if request_id in self.live:
            req = self.live[request_id]
            self.manager.cache_blocks(req, len(req.token_ids))

    @rule(request_id=consumes(requests))
    def free(self, request_id: str) -> None:
        self.manager.free(request_id)
        self.live.pop(request_id, None)

    @precondition(lambda self: bool(self.live))
    @rule()
    def abort_all(self) -> None:
        for request_id in list(self.live):
            self.manager.free(request_id)
            self.manager.free(request_id)
        self.live.clear()
        assert self.manager.num_used_blocks == 0

    @invariant()
    def blocks_add_up(self) -> None:
        pool = self.manager.pool
        assert pool.num_used_blocks + pool.num_free_blocks == pool.num_total_blocks
        assert pool.num_used_blocks == sum(b.ref_cnt > 0 for b in pool.blocks)

    @invariant()
    def ref_counts_match_holders(self) -> None:
        holders: Counter[int] = Counter()
        for request_id in self.live:
            block_ids = self.manager.block_ids(request_id)
            assert len(set(block_ids)) == len(block_ids)
            assert 0 not in block_ids  # the null block is never handed out
            holders.update(block_ids)
        for block in self.manager.pool.blocks:
            assert block.ref_cnt == holders[block.block_id]

    @invariant()
    def hash_map_is_consistent(self) -> None:
        for block_hash, block in self.manager.pool.cached_items():
            assert block.block_hash == block_hash
        # Every live request's cached blocks hold exactly its own prefix content.
        for request_id, req in self.live.items():
            hashes = self.manager.full_block_hashes(req)
            for index, block_id in enumerate(self.manager.block_ids(request_id)):
                block = self.manager.pool.blocks[block_id]
                if block.block_hash is not None:
                    assert block.block_hash == hashes[index]

    def teardown(self) -> None:
        for request_id in list(self.live):
            self.manager.free(request_id)
        assert self.manager.num_used_blocks == 0


KVCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestKVCacheMachine = KVCacheMachine.TestCase
