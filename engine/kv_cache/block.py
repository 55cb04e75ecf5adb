"""KV cache blocks and the free-block queue that orders them for LRU eviction."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class Block:
    """One fixed-size page of KV cache (``block_size`` token slots in every layer).

    ``ref_cnt`` counts the live requests holding the block. ``block_hash`` is set once the
    block is full and registered in the prefix cache; it survives ``ref_cnt`` reaching 0 so
    a later request can still hit the block until it is evicted and reused.
    ``prev``/``next`` are the links of :class:`FreeBlockQueue` (both None when not queued).
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)

    @property
    def is_queued(self) -> bool:
        return self.prev is not None


class FreeBlockQueue:
    """Blocks with ``ref_cnt == 0`` in eviction order: the head is reused first.

    A doubly linked list threaded through the blocks themselves, not a ``deque``: a
    prefix-cache hit must pull a free block out of the *middle* of the queue, which is O(1)
    here and O(n) with ``deque.remove``. Two sentinel blocks (ids -1) bound the list so
    insert and remove need no empty-list branches.
    """

    def __init__(self, blocks: Iterable[Block]) -> None:
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next = self._tail
        self._tail.prev = self._head
        self._num_blocks = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._num_blocks

    def __iter__(self) -> Iterator[Block]:
        node = self._head.next
        while node is not self._tail:
            assert node is not None
            yield node
            node = node.next

    def popleft(self) -> Block:
        """Remove and return the block to evict next."""
        if self._num_blocks == 0:
            raise IndexError("pop from an empty FreeBlockQueue")
        block = self._head.next
        assert block is not None
        self.remove(block)
        return block

    def append(self, block: Block) -> None:
        """Queue ``block`` last: it is the most recently used."""
        self._link(block, self._tail.prev, self._tail)

    def appendleft(self, block: Block) -> None:
        """Queue ``block`` first: it is worthless to keep (no cached content)."""
        self._link(block, self._head, self._head.next)

    def remove(self, block: Block) -> None:
        """Unlink ``block`` from anywhere in the queue in O(1)."""
        if block.prev is None or block.next is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        block.prev.next = block.next
        block.next.prev = block.prev
        block.prev = block.next = None
        self._num_blocks -= 1

    def _link(self, block: Block, before: Block | None, after: Block | None) -> None:
        if block.is_queued:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        assert before is not None and after is not None
        block.prev, block.next = before, after
        before.next = block
        after.prev = block
        self._num_blocks += 1
