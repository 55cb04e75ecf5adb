"""Runs one engine step on the model: owns the KV cache tensors, builds the flat batch.

The scheduler decides *what* runs (which tokens of which sequences, in which blocks); the
runner turns that into tensors — token ids, positions, slot mapping, block tables,
multimodal embeddings spliced over their placeholder rows — runs the model once and returns
the logits of the rows that need sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.config import ModelConfig
from engine.cuda_graphs import DEFAULT_BUCKETS, DecodeGraphs, EagerStepGraph, block_table
from engine.layers.attention import AttentionMetadata, KVCache, PagedAttention
from engine.models import ErnieModel


@dataclass
class MediaSlice:
    """Embeddings of one image/video covering prompt rows `[start, start + len(embeds))`."""

    start: int
    embeds: torch.Tensor  # [n, D]


@dataclass
class StepSequence:
    """The part of one sequence computed in this step."""

    token_ids: list[int]
    positions: torch.Tensor | None  # [3, n] (VL) or [n] (text) for these tokens
    """None: text rows, at `text_position + i` on every position row (generated tokens;
    spares a tensor per sequence per decode step)."""
    num_computed: int  # tokens of this sequence already in the KV cache
    block_ids: list[int]
    media: list[MediaSlice] = field(default_factory=list)  # absolute prompt rows
    vision_rows: torch.Tensor | None = None  # [n] bool: rows for the vision experts
    logits: str = "last"  # "last", "all" or "none"
    text_position: int = 0  # the first token's position when `positions` is None

    def position_tensor(self, rows: int) -> torch.Tensor:
        """`positions`, or the text rows' `[rows, n]` (`[n]` when rows is 1)."""
        if self.positions is not None:
            return self.positions
        p = torch.arange(self.text_position, self.text_position + len(self.token_ids))
        return p if rows == 1 else p.expand(rows, -1)


class ModelRunner:
    def __init__(
        self,
        model: ErnieModel,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        cuda_graphs: bool | None = None,
        max_model_len: int | None = None,
        graph_buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    ) -> None:
        """cuda_graphs: replay pure-decode steps from CUDA graphs (default: on CUDA devices;
        True on CPU runs the same path with an eager stand-in, for tests).
        max_model_len bounds the graphs' block-table width (default: the model's limit)."""
        self.model, self.cfg = model, cfg
        self.block_size, self.num_blocks = block_size, num_blocks
        self.dtype, self.device = dtype, device
        t = cfg.text
        # this rank's KV heads (all of them without tensor parallelism)
        kv_heads = next(
            (m.num_kv_heads for m in model.modules() if isinstance(m, PagedAttention)),
            t.num_kv_heads,
        )
        shape = (num_blocks, block_size, kv_heads, t.head_dim)
        self.kv_caches: list[KVCache] = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(t.num_layers)
        ]
        self.position_rows = 3 if t.mrope_section is not None else 1
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" if cuda_graphs is None else cuda_graphs:
            max_len = min(max_model_len or t.max_position_embeddings, num_blocks * block_size)
            self.graphs = DecodeGraphs(
                model,
                self.kv_caches,
                max_blocks_per_seq=-(-max_len // block_size),
                position_rows=self.position_rows,
                device=device,
                buckets=graph_buckets,
                make_graph=None if device.type == "cuda" else EagerStepGraph,
            )

    @staticmethod
    def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        t = cfg.text
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * t.num_layers * block_size * t.num_kv_heads * t.head_dim * elem

    def slot_mapping(self, seq: StepSequence) -> list[int]:
        bs = self.block_size
        start = seq.num_computed
        return [
            seq.block_ids[p // bs] * bs + p % bs for p in range(start, start + len(seq.token_ids))
        ]

    @torch.inference_mode()
    def run(
        self,
        seqs: list[StepSequence],
        after_layer: Callable[[int], None] | None = None,
        export_blocks: list[int] | None = None,
        token_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Run the step; return per sequence the logits `[k, V]` it asked for (k may be 0).

        `after_layer(i)` is called once layer i's KV is in the cache (KV streaming). Pure
        decode steps without it replay a CUDA graph (logits then view the graph's output
        buffer: consume them before the next step). `export_blocks`: the blocks the hook
        reads (a tensor-parallel runner gathers them; here they are in this cache).
        `token_ids`: the step's flat input ids `[T]` on the device, in place of the
        sequences' own (the previous step's sampled tokens, not yet on the host: async
        scheduling); the sequences' `token_ids` then only count the rows."""
        if token_ids is not None:
            n = sum(len(s.token_ids) for s in seqs)
            assert token_ids.shape == (n,) and token_ids.device.type == self.device.type, (
                tuple(token_ids.shape),
                n,
            )
        if after_layer is None and self._graphable(seqs):
            return self._run_graph(seqs, token_ids)
        dev = self.device
        ids = token_ids
        if ids is None:
            ids = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.long, device=dev)
        positions = self._positions(seqs)
        meta = self._metadata(seqs)
        embeds, vision = self._embeddings(seqs, ids)
        hidden = self.model(ids, positions, self.kv_caches, meta, embeds, vision, after_layer)
        return self._logits(seqs, hidden)

    def _positions(self, seqs: list[StepSequence]) -> torch.Tensor:
        """The batch's positions `[3, T]` (VL) or `[T]` on the device."""
        dev, rows = self.device, self.position_rows
        if all(s.positions is None for s in seqs):  # text rows only: one host tensor
            flat = [s.text_position + i for s in seqs for i in range(len(s.token_ids))]
            p = torch.tensor(flat, dtype=torch.long)
            return (p if rows == 1 else p.expand(rows, -1)).to(dev)
        return torch.cat([s.position_tensor(rows).to(dev) for s in seqs], dim=-1)

    def token_buffer(self, n: int) -> torch.Tensor | None:
        """Where a step's n sampled tokens may go so that a captured next step reads them
        without a copy (`DecodeGraphs.token_buffer`); None without graphs."""
        return None if self.graphs is None else self.graphs.token_buffer(n)

    def _graphable(self, seqs: list[StepSequence]) -> bool:
        """One new text token per sequence, no media rows in it, and a captured size fits."""
        g = self.graphs
        if g is None or not seqs or g.bucket(len(seqs)) is None:
            return False
        bs, width = self.block_size, g.width
        for s in seqs:
            nb = len(s.block_ids)
            if len(s.token_ids) != 1 or nb > width or s.num_computed // bs >= nb:
                return False
            if s.positions is None:
                if s.vision_rows is None and not s.media:
                    continue  # the common decode row: nothing more to check
            elif s.positions.numel() != g.position_rows:
                return False
            if s.vision_rows is not None and bool(s.vision_rows.any()):
                return False  # host tensor: no device sync
            pos = s.num_computed
            if any(m.start <= pos < m.start + m.embeds.shape[0] for m in s.media):
                return False
        return True

    def _run_graph(
        self, seqs: list[StepSequence], token_ids: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        assert self.graphs is not None
        bs = self.block_size
        ids, slots, lens, tables = [], [], [], []
        for s in seqs:
            p, b = s.num_computed, s.block_ids
            ids.append(s.token_ids[0])
            slots.append(b[p // bs] * bs + p % bs)
            lens.append(p + 1)
            tables.append(b)
        positions: torch.Tensor | list[int]
        if all(s.positions is None for s in seqs):
            positions = [s.text_position for s in seqs]
        else:
            rows = self.position_rows
            positions = torch.cat([s.position_tensor(rows).reshape(-1, 1) for s in seqs], dim=1)
        logits = self.graphs.run(ids, positions, slots, lens, tables, token_ids)  # [n, V]
        if all(s.logits != "none" for s in seqs):
            return list(logits.split(1))
        return [logits[i : i + (s.logits != "none")] for i, s in enumerate(seqs)]

    def _metadata(self, seqs: list[StepSequence]) -> AttentionMetadata:
        dev = self.device
        slots = [x for s in seqs for x in self.slot_mapping(s)]
        tables = block_table([s.block_ids for s in seqs])
        lens = [s.num_computed + len(s.token_ids) for s in seqs]
        starts = [0]
        for s in seqs:
            starts.append(starts[-1] + len(s.token_ids))
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.from_numpy(tables).to(dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
        )

    def _embeddings(
        self, seqs: list[StepSequence], ids: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Token embeddings with media rows spliced in, and the vision-expert row mask."""
        if not any(s.media for s in seqs) and not any(s.vision_rows is not None for s in seqs):
            return None, None
        embeds = self.model.embed(ids)
        vision = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        offset = 0
        for s in seqs:
            n = len(s.token_ids)
            lo, hi = s.num_computed, s.num_computed + n
            for m in s.media:
                a, b = max(lo, m.start), min(hi, m.start + m.embeds.shape[0])
                if a < b:  # this chunk covers rows a..b of the item
                    rows = m.embeds[a - m.start : b - m.start]
                    embeds[offset + a - lo : offset + b - lo] = rows.to(embeds.dtype)
            if s.vision_rows is not None:
                vision[offset : offset + n] = s.vision_rows.to(self.device)
            offset += n
        return embeds, vision

    def _logits(self, seqs: list[StepSequence], hidden: torch.Tensor) -> list[torch.Tensor]:
        rows, counts, offset = [], [], 0
        for s in seqs:
            n = len(s.token_ids)
            if s.logits == "all":
                rows.extend(range(offset, offset + n))
                counts.append(n)
            elif s.logits == "last":
                rows.append(offset + n - 1)
                counts.append(1)
            else:
                counts.append(0)
            offset += n
        if not rows:
            return [hidden.new_zeros(0, self.cfg.text.vocab_size) for _ in seqs]
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden[index])
        return list(logits.split(counts))
