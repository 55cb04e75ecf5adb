"""`EmbeddingCache`: encoded media by content hash, bounded in bytes, least recently used out.

Entries hold the embeddings already serialised (raw little-endian bytes in the language
model's dtype), so a hit is answered without touching torch or copying a tensor.

Why an `OrderedDict` and not `functools.lru_cache` or a heap: the bound is in bytes, not
entries, so eviction must see each entry's size and count what it drops; an OrderedDict
gives O(1) lookup, O(1) "mark as recently used" (`move_to_end`) and O(1) "oldest first"
(`popitem(last=False)`), which is all an LRU needs. One lock guards it: the event loop
reads and writes, and `stats()` may be called from a metrics thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class CachedMedia:
    """One encoded image or video, as the service returns it."""

    kind: str
    """"image" or "video"."""
    grid_thw: tuple[int, int, int]
    num_tokens: int
    dtype: str
    """Torch dtype name of `embeddings`: "float32", "bfloat16" or "float16"."""
    shape: tuple[int, int]
    """[num_tokens, hidden]."""
    embeddings: bytes
    """Raw little-endian bytes of the [num_tokens, hidden] tensor."""
    frame_timestamps: tuple[float, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes charged against the cache's capacity (the embeddings dominate)."""
        return len(self.embeddings)


@dataclass(frozen=True)
class CacheStats:
    """Counters since start (Prometheus: hits/misses/evictions are counters, the rest gauges)."""

    num_hits: int
    num_misses: int
    num_evictions: int
    num_entries: int
    num_bytes: int
    capacity_bytes: int


class EmbeddingCache:
    """Thread-safe LRU of `CachedMedia` keyed by content hash, holding at most
    `capacity_bytes` of embeddings. Capacity 0 disables caching (every get misses)."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, CachedMedia] = OrderedDict()
        self._lock = threading.Lock()
        self._num_bytes = 0
        self._num_hits = 0
        self._num_misses = 0
        self._num_evictions = 0

    def get(self, key: str) -> CachedMedia | None:
        """The entry for `key` (now the most recently used), or None; counts a hit or miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._num_misses += 1
                return None
            self._entries.move_to_end(key)
            self._num_hits += 1
            return entry

    def put(self, key: str, entry: CachedMedia) -> bool:
        """Insert (or refresh) `key`, evicting least recently used entries to fit.

        Returns False, storing nothing, when the entry alone exceeds the capacity.
        """
        size = entry.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._num_bytes -= old.nbytes
            if size > self.capacity_bytes:
                return False
            while self._num_bytes + size > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._num_bytes -= evicted.nbytes
                self._num_evictions += 1
            self._entries[key] = entry
            self._num_bytes += size
            return True

    def __contains__(self, key: str) -> bool:
        """Membership without counting or touching recency."""
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._num_bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                num_hits=self._num_hits,
                num_misses=self._num_misses,
                num_evictions=self._num_evictions,
                num_entries=len(self._entries),
                num_bytes=self._num_bytes,
                capacity_bytes=self.capacity_bytes,
            )
