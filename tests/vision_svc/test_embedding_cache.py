"""EmbeddingCache: LRU bounded in bytes, counters, thread safety; tensor byte round trips."""

from __future__ import annotations

import threading

import pytest
import torch

from vision_svc.cache import CachedMedia, EmbeddingCache
from vision_svc.encoder import tensor_bytes, tensor_from_bytes


def entry(nbytes: int, tag: int = 0) -> CachedMedia:
    return CachedMedia(
        kind="image",
        grid_thw=(1, 2, 2),
        num_tokens=1,
        dtype="float32",
        shape=(1, nbytes // 4),
        embeddings=bytes([tag % 256]) * nbytes,
    )


def test_hit_miss_and_stats() -> None:
    cache = EmbeddingCache(1000)
    assert cache.get("a") is None
    assert cache.put("a", entry(400))
    assert cache.get("a") == entry(400)
    s = cache.stats()
    assert (s.num_hits, s.num_misses, s.num_entries, s.num_bytes) == (1, 1, 1, 400)
    assert s.capacity_bytes == 1000 and s.num_evictions == 0


def test_evicts_least_recently_used_by_bytes() -> None:
    cache = EmbeddingCache(1000)
    for key in "abc":
        cache.put(key, entry(300))  # 900 bytes
    assert cache.get("a") is not None  # a is now the most recent; b is the oldest
    cache.put("d", entry(300))  # 1200 > 1000: evict b
    assert "b" not in cache and all(k in cache for k in "acd")
    cache.put("e", entry(700))  # needs 700 free: evict c, then a (d is newer)
    assert [k in cache for k in "acde"] == [False, False, True, True]
    s = cache.stats()
    assert s.num_evictions == 3 and s.num_bytes == 1000 and s.num_entries == 2


def test_refresh_replaces_bytes_without_eviction() -> None:
    cache = EmbeddingCache(1000)
    cache.put("a", entry(600))
    cache.put("a", entry(800, tag=1))
    s = cache.stats()
    assert s.num_bytes == 800 and s.num_entries == 1 and s.num_evictions == 0
    got = cache.get("a")
    assert got is not None and got.embeddings[0] == 1


def test_entry_larger_than_capacity_is_not_stored() -> None:
    cache = EmbeddingCache(1000)
    cache.put("small", entry(100))
    assert not cache.put("huge", entry(1004))
    assert "huge" not in cache and "small" in cache
    assert cache.stats().num_evictions == 0


def test_zero_capacity_disables() -> None:
    cache = EmbeddingCache(0)
    assert not cache.put("a", entry(4))
    assert cache.get("a") is None and len(cache) == 0
    with pytest.raises(ValueError, match=">= 0"):
        EmbeddingCache(-1)


def test_thread_safe_accounting() -> None:
    cache = EmbeddingCache(64 * 100)

    def worker(base: int) -> None:
        for i in range(500):
            key = f"{base}-{i % 150}"
            if cache.get(key) is None:
                cache.put(key, entry(64))

    threads = [threading.Thread(target=worker, args=(b,)) for b in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    s = cache.stats()
    assert s.num_entries == len(cache) <= 100
    assert s.num_bytes == 64 * s.num_entries
    assert s.num_hits + s.num_misses == 4 * 500


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_bytes_round_trip(dtype: torch.dtype) -> None:
    t = torch.randn(5, 7).to(dtype)
    data = tensor_bytes(t)
    assert len(data) == t.numel() * t.element_size()
    back = tensor_from_bytes(data, str(dtype).removeprefix("torch."), (5, 7))
    assert back.dtype == dtype and torch.equal(back, t)
