"""The sender's bookkeeping, shared by every transport: which blocks go where, as messages.

`Outbox` maps prefill's block ids to decode's for the blocks decode lacks and turns
`send_layer` / `finish` / `abort` into `Outgoing` messages. It gathers the blocks into a
fresh contiguous staging tensor right away (on the cache's device), so prefill may reuse
its blocks once the call returns; a transport moves the staging tensors to the host and
onto the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.kv_transfer.base import KVCache, KVReservation
from engine.kv_transfer.frames import (
    DTYPE_NAMES,
    AbortHeader,
    FinishHeader,
    LayerHeader,
    encode_header,
    read_blocks,
    tensor_buffer,
)


@dataclass
class Outgoing:
    """One message for `endpoint`: a header frame plus staging tensors (K, V) if a layer."""

    request_id: str
    endpoint: str
    header: bytes
    tensors: list[torch.Tensor] = field(default_factory=list)
    last: bool = False  # finish or abort: the request ends once this is sent
    request_bytes: int = 0  # on a finish: the KV payload of the whole request
    ready: Any = None  # a CUDA event the staging copy waits on (None on CPU)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class _Outbound:
    reservation: KVReservation
    src_ids: list[int]
    nbytes: int = 0


class Outbox:
    """Requests prefill is sending; builds their messages. Single-threaded."""

    def __init__(self, kv_caches: Sequence[KVCache]) -> None:
        assert kv_caches, "no KV cache layers"
        self.kv_caches = kv_caches
        k0 = kv_caches[0][0]
        self.block_size = k0.shape[1]
        self.block_shape = list(k0.shape[1:])
        self.dtype_name = DTYPE_NAMES[k0.dtype]
        self._live: dict[str, _Outbound] = {}

    def begin(self, request_id: str, res: KVReservation, src_block_ids: Sequence[int]) -> None:
        if request_id in self._live:
            raise ValueError(f"{request_id}: already sending")
        if res.block_size != self.block_size:
            raise ValueError(f"block size {res.block_size} != cache's {self.block_size}")
        _check_table(request_id, src_block_ids, res)
        self._live[request_id] = _Outbound(res, [int(b) for b in src_block_ids])

    def extend(self, request_id: str, src_block_ids: Sequence[int]) -> None:
        """Replace the source block table (it grows with each prefill chunk)."""
        out = self._live.get(request_id)
        if out is None:
            return
        _check_table(request_id, src_block_ids, out.reservation)
        out.src_ids = [int(b) for b in src_block_ids]

    def is_live(self, request_id: str) -> bool:
        return request_id in self._live

    def layer(self, request_id: str, layer: int, blocks: range | None) -> Outgoing | None:
        """The message for one layer; None when decode lacks none of `blocks` or the
        request is unknown (failed or aborted)."""
        out = self._live.get(request_id)
        if out is None:
            return None
        res = out.reservation
        positions = self._positions(request_id, out, blocks)
        if not positions:
            return None
        header = LayerHeader(
            request_id=request_id,
            token=res.token,
            layer=layer,
            block_ids=[res.block_ids[p] for p in positions],
            dtype=self.dtype_name,
            block_shape=self.block_shape,
        )
        # fresh and contiguous copies: the bytes of [n, block_size, H_kv, D]
        k, v = read_blocks(self.kv_caches, layer, [out.src_ids[p] for p in positions])
        out.nbytes += k.nbytes + v.nbytes
        ready = None
        if k.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        return Outgoing(request_id, res.endpoint, encode_header(header), [k, v], ready=ready)

    def source_blocks(self, request_id: str, blocks: range | None) -> list[int]:
        """The source block ids `layer(request_id, i, blocks)` reads, in order."""
        out = self._live.get(request_id)
        if out is None:
            return []
        return [out.src_ids[p] for p in self._positions(request_id, out, blocks)]

    @staticmethod
    def _positions(request_id: str, out: _Outbound, blocks: range | None) -> list[int]:
        res = out.reservation
        wanted = range(len(out.src_ids)) if blocks is None else blocks
        positions = [p for p in wanted if res.num_cached_blocks <= p < len(res.block_ids)]
        if positions and max(positions) >= len(out.src_ids):
            raise ValueError(
                f"{request_id}: block positions {blocks} beyond the {len(out.src_ids)} "
                "source blocks known (call extend first)"
            )
        return positions

    def finish(
        self, request_id: str, first_token_id: int, extra: dict[str, Any]
    ) -> Outgoing | None:
        out = self._live.pop(request_id, None)
        if out is None:
            return None
        res = out.reservation
        header = FinishHeader(request_id, res.token, int(first_token_id), dict(extra))
        msg = Outgoing(request_id, res.endpoint, encode_header(header), last=True)
        msg.request_bytes = out.nbytes
        return msg

    def abort(self, request_id: str, reason: str = "") -> Outgoing | None:
        out = self._live.pop(request_id, None)
        if out is None:
            return None
        header = AbortHeader(request_id, out.reservation.token, reason)
        return Outgoing(request_id, out.reservation.endpoint, encode_header(header), last=True)


def _check_table(request_id: str, src_block_ids: Sequence[int], res: KVReservation) -> None:
    if len(src_block_ids) > len(res.block_ids):
        raise ValueError(
            f"{request_id}: {len(src_block_ids)} source blocks for {len(res.block_ids)} reserved"
        )


def host_frames(msg: Outgoing, stream: Any = None) -> list[Any]:
    """The wire frames of `msg`: header bytes + zero-copy views of host staging tensors.

    CUDA staging tensors are copied to the host on `stream` after `msg.ready`, so the copy
    never waits for later layers queued on the compute stream.
    """
    tensors = msg.tensors
    if tensors and tensors[0].is_cuda:
        with torch.cuda.stream(stream):
            torch.cuda.current_stream().wait_event(msg.ready)
            tensors = [t.to("cpu", non_blocking=True) for t in tensors]
            torch.cuda.current_stream().synchronize()
    return [msg.header, *(tensor_buffer(t) for t in tensors)]
