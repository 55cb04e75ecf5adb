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
from kernels.decode_inputs import decode_inputs

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
        # R = 1 (ids) + 1 (src) + position_rows + 1 (slots) + 1 (seq lens); one host->device
        # copy. src[i] >= 0: row i's id is fed[src[i]], sampled on the device by the step before
        self.num_rows = r = position_rows + 4
        # One int64 buffer on each side, copied as one prefix a step: the rows [R, B], a
        # header (n, width), then the step's block table packed [n, width] as int32 (the
        # graph's first launch spreads it into the [B, W] table it reads: one copy, not two).
        self._head = r * b + 2  # words before the staged table
        words = self._head + (b * self.width + 1) // 2
        pin = device.type == "cuda"
        self.host_all = torch.zeros(words, dtype=torch.long, pin_memory=pin)
        self.host = self.host_all[: r * b].view(r, b)  # [R, B]
        self.host_header = self.host_all[r * b : self._head]  # [2] = (n, width)
        self.host_tables = self.host_all[self._head :].view(torch.int32)  # >= B * W
        self.host_np, self.host_tables_np = self.host.numpy(), self.host_tables.numpy()
        self.host_header_np = self.host_header.numpy()
        self._arange = np.arange(b, dtype=np.int64)
        self.copied = torch.cuda.Event() if pin else None  # the last copy out of the host
        self.dev_all = torch.zeros(words, dtype=torch.long, device=device)
        self.packed = self.dev_all[: r * b].view(r, b)  # [R, B]
        self.header = self.dev_all[r * b : self._head]
        self.staged = self.dev_all[self._head :].view(torch.int32)
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)  # [B]
        self.fed = torch.zeros(b, dtype=torch.long, device=device)  # [B] sampled ids
        self.ids = torch.zeros(b, dtype=torch.long, device=device)  # [B] the step's ids
        self.tables = torch.zeros(b, self.width, dtype=torch.int32, device=device)  # [B, W]
        self.query_start = torch.arange(b + 1, dtype=torch.int32, device=device)  # [B + 1]
        self.graphs: dict[int, tuple[StepGraph, torch.Tensor]] = {}

    def token_buffer(self, n: int) -> torch.Tensor | None:
        """Where the sampler may write a step's n tokens (`fed[:n]`) so that the next captured
        step reads them without a copy; None above the largest bucket."""
        return self.fed[:n] if n <= self.fed.shape[0] else None

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def _pad_inputs(self, batch: int, bucket: int | None = None) -> None:
        """Rows batch..bucket-1 (default: all past batch): token 0 at position 0, slot -1 (no
        KV write), one key of context."""
        h = self.host_np
        h[:, batch:bucket] = 0
        h[1, batch:bucket] = -1
        h[-2, batch:bucket] = -1
        h[-1, batch:bucket] = 1

    def _step(self, b: int) -> Callable[[], torch.Tensor]:
        packed = self.packed[:, :b]
        ids, slots = self.ids[:b], packed[-2]
        positions = packed[2:-2] if self.position_rows == 3 else packed[2]
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=self.tables[:b],
            seq_lens=self.seq_lens[:b],
            query_start_loc=self.query_start[: b + 1],
        )

        def step() -> torch.Tensor:
            # the ids (host or fed), int32 lengths and the block table, inside the graph
            decode_inputs(
                packed[0], packed[1], self.fed, packed[-1], ids, self.seq_lens[:b],
                tables=(self.header, self.staged, self.tables[:b]),
            )  # fmt: skip
            hidden = self.model(ids, positions, self.kv_caches, meta)  # decode: all text
            return self.model.compute_logits(hidden)  # [b, V]

        return step

    def _graph(self, b: int) -> tuple[StepGraph, torch.Tensor]:
        if b not in self.graphs:
            # Capture on padding rows only: the warm-up run must not write the KV cache.
            if self.copied is not None:
                self.copied.synchronize()  # the host buffers may still be in flight
            self._pad_inputs(0)
            self.host_header_np[:] = 0  # no table rows
            self.dev_all[: self._head].copy_(self.host_all[: self._head])
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
        `[n]` (int64, on the device) replaces `ids`, so the step can take tokens the host has
        not read back yet: read by the graph from `fed`, where the sampler put them
        (`token_buffer`), or copied there on the stream first."""
        n = len(ids)
        b = self.bucket(n)
        width = max(map(len, tables))
        assert b is not None and width <= self.width, (n, self.width)
        if self.copied is not None:
            self.copied.synchronize()  # the host buffers may still be in flight to the device
        graph, out = self._graph(b)
        h = self.host_np  # numpy views of the pinned buffers: cheap element writes
        h[0, :n] = ids
        if device_ids is None:
            h[1, :n] = -1
        else:
            h[1, :n] = self._arange[:n]
            if device_ids.data_ptr() != self.fed.data_ptr() or not device_ids.is_contiguous():
                # stream order puts this after the step in flight read fed; the engine makes
                # the stream wait for the last tokens' copy to the host out of it first
                self.fed[:n].copy_(device_ids)
        if isinstance(positions, list):
            h[2:-2, :n] = positions  # text rows: the same position on every row
        else:
            h[2:-2, :n] = positions.reshape(self.position_rows, n).numpy()
        h[-2, :n] = slots
        h[-1, :n] = seq_lens
        if n < b:
            self._pad_inputs(n, b)
        # Entries past a sequence's blocks stay stale: the kernels never read them.
        block_table(tables, width, self.host_tables_np[: n * width].reshape(n, width))
        self.host_header_np[:] = (n, width)
        words = self._head + (n * width + 1) // 2
        self.dev_all[:words].copy_(self.host_all[:words], non_blocking=True)  # one copy
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
