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
        # the step's block table, packed [n, w] at the front (pinned: an async copy)
        self.host_tables = torch.zeros(b * self.width, dtype=torch.int32, pin_memory=pin)
        self.host_np, self.host_tables_np = self.host.numpy(), self.host_tables.numpy()
        self.copied = torch.cuda.Event() if pin else None  # the last copy out of the host
        self.packed = torch.zeros(self.num_rows, b, dtype=torch.long, device=device)  # [R, B]
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)  # [B]
        self.tables = torch.zeros(b, self.width, dtype=torch.int32, device=device)  # [B, W]
        self.query_start = torch.arange(b + 1, dtype=torch.int32, device=device)  # [B + 1]
        self.graphs: dict[int, tuple[StepGraph, torch.Tensor]] = {}

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def _pad_inputs(self, batch: int, bucket: int | None = None) -> None:
        """Rows batch..bucket-1 (default: all past batch): token 0 at position 0, slot -1 (no
        KV write), one key of context."""
        h = self.host_np
        h[:, batch:bucket] = 0
        h[-2, batch:bucket] = -1
        h[-1, batch:bucket] = 1

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
        device_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decode token per sequence -> logits `[n, V]` (a view, valid until the next run).

        positions `[position_rows, n]` (or `[n]`), or one int per sequence for text rows
        (the same on every position row); tables: each sequence's block ids. `device_ids`
        `[n]` (int64, on the device) replaces `ids`: copied in on the stream, after the
        host rows, so the step can take tokens the host has not read back yet."""
        n = len(ids)
        b = self.bucket(n)
        width = max(map(len, tables))
        assert b is not None and width <= self.width, (n, self.width)
        if self.copied is not None:
            self.copied.synchronize()  # the host buffers may still be in flight to the device
        graph, out = self._graph(b)
        h = self.host_np  # numpy views of the pinned buffers: cheap element writes
        h[0, :n] = ids
        if isinstance(positions, list):
            h[1:-2, :n] = positions  # text rows: the same position on every row
        else:
            h[1:-2, :n] = positions.reshape(self.position_rows, n).numpy()
        h[-2, :n] = slots
        h[-1, :n] = seq_lens
        if n < b:
            self._pad_inputs(n, b)
        self.packed.copy_(self.host, non_blocking=True)  # one contiguous copy of a few KB
        if device_ids is not None:
            self.packed[0, :n].copy_(device_ids)
        # Entries past a sequence's blocks stay stale: the kernels never read them.
        block_table(tables, width, self.host_tables_np[: n * width].reshape(n, width))
        staged = self.host_tables[: n * width].view(n, width)
        self.tables[:n, :width].copy_(staged, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        graph.replay()
        return out[:n]


def block_table(
    tables: list[list[int]], width: int | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """`[n, width]` int32 block table, rows zero-padded to the longest (one host array);
    `out` (`[n, width]`, width the longest row) is filled in place when given."""
    if len(tables) == 1:  # decode at batch 1: one row, nothing to pad
        row = np.asarray(tables[0], dtype=np.int32)
        if out is None:
            return row.reshape(1, -1)
        out[0] = row
        return out
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    width = int(lens.max()) if width is None else width
    flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lens.sum()))
    if out is None:
        out = np.zeros((len(tables), width), dtype=np.int32)
    else:
        out[:] = 0
    if lens.min() == width:
        out.reshape(-1)[:] = flat
    else:
        out[np.arange(width)[None, :] < lens[:, None]] = flat
    return out
