"""The receiver's bookkeeping, shared by every transport: reservations, validation, copies.

A transport only moves messages; `ReservationBook.on_message` decides whether a message is
admissible and writes it into the cache. Admissible means: the header parses, names a live
reservation, carries that reservation's one-time token, and (for a layer) has the cache's
dtype and block shape and writes only blocks the reservation lacks. Anything else is
dropped and counted; `on_message` never raises, so a hostile peer cannot stop the receiver.
A reservation leaves the book when it ends (done, failed, aborted), which makes its token
worthless: replays are rejected as unknown.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.kv_transfer.base import (
    KVCache,
    KVReceiver,
    KVReservation,
    TransferError,
    TransferEvent,
    TransferStatus,
)
from engine.kv_transfer.frames import (
    DTYPE_NAMES,
    AbortHeader,
    FinishHeader,
    FrameError,
    LayerHeader,
    buffer_tensor,
    decode_header,
    write_blocks,
)

logger = logging.getLogger(__name__)


@dataclass
class _Inbound:
    token: bytes
    lacking: frozenset[int]  # decode block ids prefill must write
    pending: list[set[int]]  # per layer: lacking blocks not yet written
    deadline: float  # time.monotonic()
    nbytes: int = 0
    status: TransferStatus = TransferStatus.WAITING


class ReservationBook:
    """Live reservations of one receiver; thread-safe (one lock guards state and copies)."""

    def __init__(self, kv_caches: Sequence[KVCache]) -> None:
        assert kv_caches, "no KV cache layers"
        k0 = kv_caches[0][0]
        for k, v in kv_caches:
            assert k.shape == v.shape == k0.shape and k.dtype == v.dtype == k0.dtype
            assert k.is_contiguous() and v.is_contiguous()
        self.kv_caches = kv_caches
        self.num_blocks = k0.shape[0]
        self.block_shape = list(k0.shape[1:])  # [block_size, H_kv, D]
        self.dtype_name = DTYPE_NAMES[k0.dtype]
        self.lock = threading.Lock()
        self._live: dict[str, _Inbound] = {}
        self._events: list[TransferEvent] = []
        self.num_frames_rejected = 0
        self.bytes_received = 0
        self.num_transfers_done = 0
        self.num_transfers_failed = 0

    def expect(
        self,
        request_id: str,
        token: bytes,
        block_ids: Sequence[int],
        num_cached_blocks: int,
        deadline_s: float,
    ) -> None:
        lacking = [int(b) for b in block_ids[num_cached_blocks:]]
        if any(not 0 <= b < self.num_blocks for b in lacking) or len(set(lacking)) != len(lacking):
            raise ValueError(f"{request_id}: block ids out of range or repeated")
        if len(token) < 8:
            raise ValueError("transfer token too short")
        num_layers = len(self.kv_caches)
        pending = [set(lacking) for _ in range(num_layers)]
        with self.lock:
            if request_id in self._live:
                raise ValueError(f"{request_id}: already expected")
            deadline = time.monotonic() + deadline_s
            self._live[request_id] = _Inbound(token, frozenset(lacking), pending, deadline)

    def abort(self, request_id: str) -> None:
        with self.lock:
            self._live.pop(request_id, None)

    def poll(self) -> list[TransferEvent]:
        """Fail overdue reservations; return and clear the events so far."""
        now = time.monotonic()
        with self.lock:
            for rid in [r for r, res in self._live.items() if res.deadline <= now]:
                self._fail(rid, TransferError.TIMEOUT, "KV did not arrive before the deadline")
            events, self._events = self._events, []
        return events

    def num_live(self) -> int:
        with self.lock:
            return len(self._live)

    def on_message(self, frames: Sequence[Any]) -> None:
        """Admit one message or drop and count it. Never raises."""
        try:
            header = decode_header(frames[0])
        except (FrameError, IndexError, TypeError) as e:
            self._reject(f"malformed: {e}")
            return
        with self.lock:
            res = self._live.get(header.request_id)
            if res is None or not hmac.compare_digest(res.token, header.token):
                self.num_frames_rejected += 1  # forged, replayed, or for an ended request
                return
            try:
                self._apply(header.request_id, res, header, frames[1:])
            except FrameError:
                self.num_frames_rejected += 1

    def _apply(self, rid: str, res: _Inbound, header: Any, payload: Sequence[Any]) -> None:
        if isinstance(header, LayerHeader):
            self._write_layer(res, header, payload)
        elif isinstance(header, FinishHeader):
            missing = sum(len(p) for p in res.pending)
            if missing:
                self._fail(rid, TransferError.INCOMPLETE, f"{missing} layer blocks never came")
            else:
                self._done(rid, res, header)
        elif isinstance(header, AbortHeader):
            self._fail(rid, TransferError.ABORTED, f"prefill aborted: {header.reason}")

    def _write_layer(self, res: _Inbound, h: LayerHeader, payload: Sequence[Any]) -> None:
        if len(payload) != 2:
            raise FrameError(f"layer message with {len(payload)} payload frames")
        if not 0 <= h.layer < len(self.kv_caches):
            raise FrameError(f"layer {h.layer} out of range")
        if h.dtype != self.dtype_name or h.block_shape != self.block_shape:
            raise FrameError(f"got {h.dtype} {h.block_shape}, cache is {self.dtype_name}")
        ids = h.block_ids
        if not ids or len(set(ids)) != len(ids) or not res.lacking.issuperset(ids):
            raise FrameError("block ids outside the reservation's lacking blocks")
        dtype = self.kv_caches[0][0].dtype
        shape = [len(ids), *self.block_shape]
        k = buffer_tensor(payload[0], dtype, shape)  # validates sizes before any write
        v = buffer_tensor(payload[1], dtype, shape)
        write_blocks(self.kv_caches, h.layer, ids, k, v)
        res.pending[h.layer].difference_update(ids)
        res.status = TransferStatus.TRANSFERRING
        res.nbytes += k.nbytes + v.nbytes
        self.bytes_received += k.nbytes + v.nbytes

    def _done(self, rid: str, res: _Inbound, h: FinishHeader) -> None:
        k0 = self.kv_caches[0][0]
        if k0.is_cuda:  # the copies ran on this thread's stream: done means in the cache
            torch.cuda.current_stream(k0.device).synchronize()
        del self._live[rid]
        self.num_transfers_done += 1
        self._events.append(
            TransferEvent(
                rid,
                TransferStatus.DONE,
                first_token_id=h.first_token_id,
                extra=h.extra,
                num_bytes=res.nbytes,
            )
        )

    def _fail(self, rid: str, error: TransferError, detail: str) -> None:
        del self._live[rid]
        self.num_transfers_failed += 1
        self._events.append(TransferEvent(rid, TransferStatus.FAILED, error, detail))

    def _reject(self, why: str) -> None:
        logger.debug("KV frame rejected: %s", why)
        with self.lock:
            self.num_frames_rejected += 1


class BookedReceiver(KVReceiver):
    """A `KVReceiver` whose state lives in a `ReservationBook`; transports add the wire."""

    def __init__(self, kv_caches: Sequence[KVCache]) -> None:
        self._book = ReservationBook(kv_caches)
        self.block_size = self._book.block_shape[0]

    num_frames_rejected = property(lambda self: self._book.num_frames_rejected)
    bytes_received = property(lambda self: self._book.bytes_received)
    num_transfers_done = property(lambda self: self._book.num_transfers_done)
    num_transfers_failed = property(lambda self: self._book.num_transfers_failed)

    def expect(
        self,
        request_id: str,
        token: bytes,
        block_ids: Sequence[int],
        num_cached_blocks: int,
        deadline_s: float,
    ) -> KVReservation:
        self._book.expect(request_id, token, block_ids, num_cached_blocks, deadline_s)
        ids = tuple(int(b) for b in block_ids)
        return KVReservation(self.endpoint, ids, num_cached_blocks, token, self.block_size)

    def poll(self) -> list[TransferEvent]:
        return self._book.poll()

    def abort(self, request_id: str) -> None:
        self._book.abort(request_id)
