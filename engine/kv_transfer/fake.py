"""In-process transport for unit tests: senders hand messages straight to a receiver.

Receivers register under `fake://<bind>` in the transport's registry; a sender looks the
endpoint up and calls the receiver's `ReservationBook` synchronously with the same frames a
ZMQ sender would put on the wire (header bytes + zero-copy views of the staging tensors),
so validation, block mapping and events behave exactly as over ZMQ, without sockets or
threads. An endpoint missing from the registry is an unreachable peer (SEND_FAILED).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from engine.kv_transfer.base import (
    KVCache,
    KVReservation,
    KVSender,
    KVTransport,
    TransferError,
    TransferEvent,
    TransferStatus,
)
from engine.kv_transfer.outbox import Outbox, Outgoing, host_frames
from engine.kv_transfer.reservations import BookedReceiver


class FakeKVReceiver(BookedReceiver):
    def __init__(self, transport: FakeTransport, kv_caches: Sequence[KVCache], bind: str) -> None:
        self._transport = transport
        self._endpoint = bind if bind.startswith("fake://") else f"fake://{bind}"
        super().__init__(kv_caches)
        transport.register(self._endpoint, self)

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def deliver(self, frames: list[Any]) -> None:
        """What the wire would do: hand one message to the book."""
        self._book.on_message(frames)

    def close(self) -> None:
        self._transport.unregister(self._endpoint)


class FakeKVSender(KVSender):
    def __init__(self, transport: FakeTransport, kv_caches: Sequence[KVCache]) -> None:
        self._transport = transport
        self._outbox = Outbox(kv_caches)
        self._events: list[TransferEvent] = []
        self.bytes_sent = 0
        self.seconds_sending = 0.0
        self.num_failures = 0

    def begin(
        self, request_id: str, reservation: KVReservation, src_block_ids: Sequence[int] = ()
    ) -> None:
        self._outbox.begin(request_id, reservation, src_block_ids)

    def extend(self, request_id: str, src_block_ids: Sequence[int]) -> None:
        self._outbox.extend(request_id, src_block_ids)

    def source_blocks(self, request_id: str, blocks: range | None = None) -> list[int]:
        return self._outbox.source_blocks(request_id, blocks)

    def send_layer(self, request_id: str, layer: int, blocks: range | None = None) -> None:
        msg = self._outbox.layer(request_id, layer, blocks)
        if msg is not None:
            self._deliver(msg)

    def finish(self, request_id: str, first_token_id: int, extra: dict[str, Any]) -> None:
        msg = self._outbox.finish(request_id, first_token_id, extra)
        if msg is not None and self._deliver(msg):
            done = TransferEvent(request_id, TransferStatus.DONE, num_bytes=msg.request_bytes)
            self._events.append(done)

    def poll(self) -> list[TransferEvent]:
        events, self._events = self._events, []
        return events

    def abort(self, request_id: str) -> None:
        msg = self._outbox.abort(request_id, "aborted by prefill")
        if msg is not None and self._transport.lookup(msg.endpoint) is not None:
            self._deliver(msg)

    def close(self) -> None:
        self._outbox = Outbox(self._outbox.kv_caches)

    def _deliver(self, msg: Outgoing) -> bool:
        receiver = self._transport.lookup(msg.endpoint)
        if receiver is None:
            self._fail(msg.request_id, f"no receiver at {msg.endpoint}")
            return False
        start = time.perf_counter()
        receiver.deliver(host_frames(msg))
        self.seconds_sending += time.perf_counter() - start
        self.bytes_sent += msg.nbytes
        return True

    def _fail(self, request_id: str, detail: str) -> None:
        self._outbox.abort(request_id)  # forget it: later calls for it are no-ops
        self.num_failures += 1
        self._events.append(
            TransferEvent(request_id, TransferStatus.FAILED, TransferError.SEND_FAILED, detail)
        )


class FakeTransport(KVTransport):
    """A registry of in-process receivers keyed by endpoint; build both ends from one."""

    def __init__(self) -> None:
        self._receivers: dict[str, FakeKVReceiver] = {}

    def receiver(self, kv_caches: Sequence[KVCache], bind: str = "kv") -> FakeKVReceiver:
        return FakeKVReceiver(self, kv_caches, bind)

    def sender(self, kv_caches: Sequence[KVCache]) -> FakeKVSender:
        return FakeKVSender(self, kv_caches)

    def register(self, endpoint: str, receiver: FakeKVReceiver) -> None:
        if endpoint in self._receivers:
            raise ValueError(f"{endpoint} already bound")
        self._receivers[endpoint] = receiver

    def unregister(self, endpoint: str) -> None:
        self._receivers.pop(endpoint, None)

    def lookup(self, endpoint: str) -> FakeKVReceiver | None:
        return self._receivers.get(endpoint)
