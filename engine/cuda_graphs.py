"""CUDA graphs for decode steps: one captured forward + LM head per batch-size bucket.

A decode step of the 28B model launches ~600 kernels of a few microseconds each; eagerly,
Python and the launch path cost more than the GPU work. A graph replays the whole step with
one launch. Graphs freeze shapes and addresses, so each bucket of B sequences reads static
buffers (ids, positions, slot mapping, seq lens, block tables) that the runner fills before
each replay, and a batch of n <= B sequences is padded to B with rows that write nothing
(slot -1) and attend to one key (seq_len 1). Block tables are as wide as the longest
sequence could be; the attention kernel splits each sequence by its own length.

`StepGraph` is the seam: `CudaStepGraph` captures with `torch.cuda.graph`; the CPU fake
`EagerStepGraph` replays by calling the step again, so the padding and buffer logic runs
in CPU tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from engine.layers.attention import AttentionMetadata, KVCache

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class StepGraph(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Record `fn` (reading only static buffers); return its static output."""
        ...

    def replay(self) -> None:
        """Run the recorded step again; the output tensor from `capture` is refreshed."""
        ...


class CudaStepGraph:
    def __init__(self, pool: tuple[int, int]) -> None:
        self.pool = pool
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        # Warm up on a side stream first: Triton compiles and cuBLAS sets up its workspace
        # there, not inside the capture (either would break or bloat it).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=self.pool):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


class EagerStepGraph:
    """CPU stand-in: same buffers, same padding; "replay" runs the step eagerly."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self) -> None:
        self.out.copy_(self.fn())


class DecodeGraphs:
    """Captured decode steps, one per bucket, sharing one set of static input buffers."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[KVCache],
        max_blocks_per_seq: int,
        position_rows: int,
        device: torch.device,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        make_graph: Callable[[], StepGraph] | None = None,
    ) -> None:
        """position_rows: 3 for the VL model's (t, h, w) positions, 1 for plain text."""
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.buckets = tuple(sorted(buckets))
        self.width, self.position_rows = max_blocks_per_seq, position_rows
        if make_graph is None:
            pool = torch.cuda.graph_pool_handle()  # shared: graphs never replay at once
            make_graph = lambda: CudaStepGraph(pool)  # noqa: E731
        self.make_graph = make_graph
        b = self.buckets[-1]
        # R = 1 (ids) + position_rows + 1 (slots) + 1 (seq lens); one host->device copy
        self.num_rows = position_rows + 3
        pin = device.type == "cuda"
        self.host = torch.zeros(self.num_rows, b, dtype=torch.long, pin_memory=pin)  # [R, B]
        self.copied = torch.cuda.Event() if pin else None  # the last copy out of `host`
        self.packed = torch.zeros(self.num_rows, b, dtype=torch.long, device=device)  # [R, B]
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)  # [B]
        self.tables = torch.zeros(b, self.width, dtype=torch.int32, device=device)  # [B, W]
        self.query_start = torch.arange(b + 1, dtype=torch.int32, device=device)  # [B + 1]
        self.graphs: dict[int, tuple[StepGraph, torch.Tensor]] = {}

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def _pad_inputs(self, batch: int) -> None:
        """Rows >= batch: token 0 at position 0, slot -1 (no KV write), one key of context."""
        h = self.host
        h[:, batch:] = 0
        h[-2, batch:] = -1
        h[-1, batch:] = 1

    def _step(self, b: int) -> Callable[[], torch.Tensor]:
        packed = self.packed[:, :b]
        ids, slots = packed[0], packed[-2]
        positions = packed[1:-2] if self.position_rows == 3 else packed[1]
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=self.tables[:b],
            seq_lens=self.seq_lens[:b],
            query_start_loc=self.query_start[: b + 1],
        )

        def step() -> torch.Tensor:
            self.seq_lens[:b].copy_(packed[-1])  # int64 -> int32 inside the graph
            hidden = self.model(ids, positions, self.kv_caches, meta)  # decode: all text
            return self.model.compute_logits(hidden)  # [b, V]

        return step

    def _graph(self, b: int) -> tuple[StepGraph, torch.Tensor]:
        if b not in self.graphs:
            # Capture on padding rows only: the warm-up run must not write the KV cache.
            self._pad_inputs(0)
            self.packed.copy_(self.host)
            graph = self.make_graph()
            self.graphs[b] = (graph, graph.capture(self._step(b)))
        return self.graphs[b]

    def run(
        self,
        ids: list[int],
        positions: torch.Tensor | list[int],
        slots: list[int],
        seq_lens: list[int],
        tables: list[list[int]],
    ) -> torch.Tensor:
        """One decode token per sequence -> logits `[n, V]` (a view, valid until the next run).

        positions `[position_rows, n]` (or `[n]`), or one int per sequence for text rows
        (the same on every position row); tables: each sequence's block ids."""
        n = len(ids)
        b = self.bucket(n)
        table = block_table(tables)  # [n, width] int32, zero-padded
        assert b is not None and table.shape[1] <= self.width, (n, self.width)
        if self.copied is not None:
            self.copied.synchronize()  # `host` may still be in flight to the device
        graph, out = self._graph(b)
        h = self.host
        if isinstance(positions, list):  # every row in one host tensor
            h[:, :n] = torch.tensor([ids, *([positions] * self.position_rows), slots, seq_lens])
        else:
            h[0, :n] = torch.tensor(ids)
            h[1:-2, :n] = positions.reshape(self.position_rows, n)
            h[-2, :n] = torch.tensor(slots)
            h[-1, :n] = torch.tensor(seq_lens)
        self._pad_inputs(n)
        self.packed.copy_(h, non_blocking=True)  # all of it: one contiguous copy of a few KB
        if self.copied is not None:
            self.copied.record()
        # Entries past a sequence's blocks stay stale: the kernels never read them.
        self.tables[:n, : table.shape[1]].copy_(torch.from_numpy(table))
        graph.replay()
        return out[:n]


def block_table(tables: list[list[int]]) -> np.ndarray:
    """`[n, width]` int32 block table, rows zero-padded to the longest (one host array)."""
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    width = int(lens.max())
    flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lens.sum()))
    out = np.zeros((len(tables), width), dtype=np.int32)
    if lens.min() == width:
        out.reshape(-1)[:] = flat
    else:
        out[np.arange(width)[None, :] < lens[:, None]] = flat
    return out
