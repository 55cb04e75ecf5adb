"""Tensor parallelism: which slice of each weight a rank holds, and the collectives.

Megatron's split, as vLLM and FastDeploy serve ERNIE: attention heads and every
intermediate dimension (dense MLP, shared experts, each routed expert) are split across
the ranks, so a decoder layer runs with two all-reduces (after `o_proj`, after the MLP or
MoE block's combined output) and the LM head is split over the vocabulary (one all-gather
of the logits). Embedding, norms, routers and the vision tower are replicated. When there
are fewer KV heads than ranks each rank holds the one KV head its query heads read.

A model is built for one rank inside `use_tp(info)`: layers read `current_tp()` at
construction and keep the `TPInfo`, whose process group runs their collectives. With one
rank (the default) nothing is split and every collective returns its input untouched.
The group is a plain `ProcessGroup` object (gloo on CPU, NCCL on GPUs), never the global
default group, so several engines of different sizes can live in one process (tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


class TensorParallelError(ValueError):
    """The model's shapes or the machine do not allow the asked tensor-parallel size."""


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed.ProcessGroup when size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place."""
        if self.size > 1:
            self.group.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim`, rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, root: int = 0) -> torch.Tensor:
        """`x` of rank `root` on every rank, in place."""
        if self.size > 1:
            import torch.distributed as dist

            opts = dist.BroadcastOptions()  # the (tensors, root) overload is not on every build
            opts.rootRank = root
            self.group.broadcast([x], opts).wait()
        return x


_SINGLE = TPInfo()
_current: TPInfo = _SINGLE


def current_tp() -> TPInfo:
    return _current


@contextlib.contextmanager
def use_tp(info: TPInfo) -> Iterator[TPInfo]:
    """Build a model for rank `info.rank` of `info.size` inside this block."""
    global _current
    previous, _current = _current, info
    try:
        yield info
    finally:
        _current = previous


@dataclass(frozen=True)
class Shard:
    """This rank's slice `[start, start + size)` of a checkpoint dimension of length `full`
    (rows past `full` are padding, filled with zeros)."""

    start: int
    size: int
    full: int

    def take(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The slice of checkpoint tensor `t` along `dim`, zero-padded to `size`."""
        end = min(self.start + self.size, self.full)
        part = t.narrow(dim, self.start, max(end - self.start, 0))
        if part.shape[dim] == self.size:
            return part
        shape = list(t.shape)
        shape[dim] = self.size
        out = t.new_zeros(shape)
        out.narrow(dim, 0, part.shape[dim]).copy_(part)
        return out


def even_shard(full: int, tp: TPInfo, what: str, unit: int = 1) -> Shard:
    """An even split of `full` (in multiples of `unit`, e.g. a head's width), or an error
    naming the dimension."""
    if (full // unit) % tp.size or full % unit:
        raise TensorParallelError(
            f"tensor parallel size {tp.size} does not divide the model's {what} "
            f"({full // unit}); use a size that does"
        )
    size = full // tp.size
    return Shard(tp.rank * size, size, full)


def padded_shard(full: int, tp: TPInfo) -> Shard:
    """A split of `full` rows into equal parts, the last padded (the vocabulary)."""
    size = -(-full // tp.size)
    return Shard(tp.rank * size, size, full)


def kv_head_shard(num_kv_heads: int, head_dim: int, tp: TPInfo) -> tuple[int, Shard]:
    """(KV heads on this rank, their rows of k_proj/v_proj). Fewer KV heads than ranks:
    each rank keeps the one its query heads read (replicated across ranks)."""
    if num_kv_heads % tp.size == 0:
        local = num_kv_heads // tp.size
        return local, Shard(tp.rank * local * head_dim, local * head_dim, num_kv_heads * head_dim)
    if tp.size % num_kv_heads == 0:
        head = tp.rank * num_kv_heads // tp.size
        return 1, Shard(head * head_dim, head_dim, num_kv_heads * head_dim)
    raise TensorParallelError(
        f"tensor parallel size {tp.size} and the model's {num_kv_heads} KV heads: one must "
        "divide the other"
    )


def kv_heads_of_rank(num_kv_heads: int, size: int, rank: int) -> list[int]:
    """The global KV heads rank `rank` holds, in its cache order."""
    if num_kv_heads % size == 0:
        local = num_kv_heads // size
        return list(range(rank * local, (rank + 1) * local))
    return [rank * num_kv_heads // size]


def check_tp_size(num_heads: int, num_kv_heads: int, size: int) -> None:
    """Fail early (before any process starts) when the model cannot be split `size` ways."""
    tp = TPInfo(0, size)
    even_shard(num_heads, tp, "attention heads")
    kv_head_shard(num_kv_heads, 1, tp)
