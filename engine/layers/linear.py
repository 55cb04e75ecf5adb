"""Linear layers that own their weight loading.

A checkpoint stores q, k and v (or gate and up) as separate tensors; we keep them fused in
one matrix so a step runs one GEMM instead of three. The layer, not the model, knows how a
checkpoint tensor maps onto a slice of its weight (nano-vllm's `weight_loader` idea), so
quantization or tensor parallelism can later replace the layer without touching the model.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.parallel import Shard
from kernels.gemv import linear as small_m_linear


class WeightShapeError(ValueError):
    """A checkpoint tensor does not fit the parameter the config says it should fill."""


def check_shape(name: str, expected: torch.Size | tuple[int, ...], got: torch.Size) -> None:
    if tuple(expected) != tuple(got):
        raise WeightShapeError(
            f"tensor {name!r} has shape {tuple(got)} but the config expects {tuple(expected)}"
        )


class Linear(nn.Linear):
    """nn.Linear whose `load(name, tensor)` checks the shape before copying.

    Tensor parallel: `out_shard` keeps rows of the checkpoint weight (column-parallel,
    e.g. the vocabulary-split LM head), `in_shard` keeps columns (row-parallel: `o_proj`,
    `down_proj`; the caller all-reduces the partial sums, and only rank 0 holds the bias
    so it is added once). `load` takes whole checkpoint tensors and keeps its slice.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        out_shard: Shard | None = None,
        in_shard: Shard | None = None,
        bias_here: bool = True,
    ) -> None:
        super().__init__(
            in_shard.size if in_shard else in_features,
            out_shard.size if out_shard else out_features,
            bias=bias,
        )
        self.out_shard, self.in_shard, self.bias_here = out_shard, in_shard, bias_here
        self.full_shape = (
            out_shard.full if out_shard else out_features,
            in_shard.full if in_shard else in_features,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode (M <= 4 rows on CUDA): Triton GEMV when kernels.gemv enables it; else F.linear
        if x.is_cuda and x.dim() == 2:
            return small_m_linear(x, self.weight, self.bias)
        return super().forward(x)

    def load(
        self, name: str, tensor: torch.Tensor, shard: int | None = None, is_bias: bool = False
    ) -> None:
        target = self.bias if is_bias else self.weight
        if target is None:
            if not is_bias:
                return  # a tied LM head split across ranks: the embedding holds the weight
            raise WeightShapeError(f"tensor {name!r}: the layer has no bias")
        check_shape(name, self.full_shape[:1] if is_bias else self.full_shape, tensor.shape)
        if self.out_shard is not None:
            tensor = self.out_shard.take(tensor, 0)
        if self.in_shard is not None:
            if is_bias:
                tensor = tensor if self.bias_here else torch.zeros_like(tensor)
            else:
                tensor = self.in_shard.take(tensor, 1)
        with torch.no_grad():
            target.copy_(tensor)


class MergedLinear(nn.Linear):
    """One matrix holding several projections stacked on the output dim ([q; k; v], [gate; up]).

    `load(name, tensor, shard=i)` fills rows `offsets[i]:offsets[i+1]`. Tensor parallel
    (column-parallel): `shards[i]` is this rank's slice of part i's checkpoint rows, and
    `out_sizes` are the local sizes.
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: list[int],
        bias: bool = False,
        *,
        shards: list[Shard] | None = None,
    ) -> None:
        if shards is not None:
            out_sizes = [s.size for s in shards]
        super().__init__(in_features, sum(out_sizes), bias=bias)
        self.out_sizes = list(out_sizes)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes) + 1)]
        self.shards = shards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode (M <= 4 rows on CUDA): Triton GEMV when kernels.gemv enables it; else F.linear
        if x.is_cuda and x.dim() == 2:
            return small_m_linear(x, self.weight, self.bias)
        return super().forward(x)

    def load(
        self, name: str, tensor: torch.Tensor, shard: int | None = None, is_bias: bool = False
    ) -> None:
        if shard is None:
            raise WeightShapeError(f"tensor {name!r}: a fused projection needs its part named")
        target = self.bias if is_bias else self.weight
        if target is None:
            raise WeightShapeError(f"tensor {name!r}: the layer has no bias")
        lo, hi = self.offsets[shard], self.offsets[shard + 1]
        if self.shards is not None:
            part = self.shards[shard]
            check_shape(name, (part.full, *target.shape[1:]), tensor.shape)
            tensor = part.take(tensor, 0)
        check_shape(name, target[lo:hi].shape, tensor.shape)
        with torch.no_grad():
            target[lo:hi].copy_(tensor)
