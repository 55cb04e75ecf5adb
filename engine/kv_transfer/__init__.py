"""KV-cache transfer from prefill to decode (ARCHITECTURE.md §6).

`base` is the seam (`KVReceiver`, `KVSender`, `KVTransport`, `KVReservation`,
`TransferEvent`); `fake` is the in-process transport for tests; `zmq_transport` is the
tcp/ipc one services use. `frames` is the wire format, `reservations` / `outbox` the
bookkeeping both transports share.
"""

from __future__ import annotations

from engine.kv_transfer.base import (
    KVCache,
    KVReceiver,
    KVReservation,
    KVSender,
    KVTransport,
    TransferError,
    TransferEvent,
    TransferStatus,
    new_transfer_token,
)
from engine.kv_transfer.fake import FakeTransport

__all__ = [
    "FakeTransport",
    "KVCache",
    "KVReceiver",
    "KVReservation",
    "KVSender",
    "KVTransport",
    "TransferError",
    "TransferEvent",
    "TransferStatus",
    "new_transfer_token",
]
