"""The KV transfer seam between prefill and decode: a receiver, a sender, a transport.

Decode owns the destination blocks. For each request it reserves blocks, registers a
one-time token with its `KVReceiver` (`expect`) and hands prefill a `KVReservation`
(the pb `tandem.v1.Reservation`). Prefill's `KVSender` pushes, right after each layer's KV
is written (`ModelRunner.run(seqs, after_layer=...)`), the blocks decode lacks
(`block_ids[num_cached_blocks:]`), then `finish` hands over the first sampled token. With
chunked prefill the source block table grows chunk by chunk (`begin`, then `extend`), and
each chunk's blocks leave right after each of its layers, not with the last chunk. Both
sides are driven by `poll()`: a small state machine that never blocks and returns
`TransferEvent`s, so a service loop can free blocks on either side when a transfer ends.

Lifecycle of one request (ordered, like `TransferStatus`):

    receiver: expect -> WAITING -> (layer frames) TRANSFERRING -> (finish frame) DONE
    sender:   begin  -> TRANSFERRING -> (finish, frames handed to the wire) DONE
    either:   timeout / abort / bad peer -> FAILED (an event with a `TransferError`)

Every wait is bounded: a receiver fails a reservation at its deadline, a sender fails a
request whose frames cannot be queued or sent in time. Nothing here pickles: frames are a
msgspec header behind a one-byte tag plus raw tensor buffers (see `frames.py`).
"""

from __future__ import annotations

import enum
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each [num_blocks, block_size, H_kv, D]

TOKEN_BYTES = 16


def new_transfer_token() -> bytes:
    """A fresh one-time token for `KVReceiver.expect` (unguessable, 16 bytes)."""
    return secrets.token_bytes(TOKEN_BYTES)


@dataclass(frozen=True)
class KVReservation:
    """Where prefill must write one request's KV: mirrors pb `tandem.v1.Reservation`."""

    endpoint: str  # the receiver's `endpoint`, e.g. tcp://10.0.0.5:7600 or ipc:///tmp/kv
    block_ids: tuple[int, ...]  # decode's blocks for the whole prompt, in order
    num_cached_blocks: int  # leading blocks decode already holds (never sent)
    token: bytes  # one-time transfer token; frames without it are dropped and counted
    block_size: int  # tokens per block; must match both caches

    def __post_init__(self) -> None:
        if not 0 <= self.num_cached_blocks <= len(self.block_ids):
            raise ValueError(
                f"num_cached_blocks={self.num_cached_blocks} outside [0, {len(self.block_ids)}]"
            )
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    @property
    def num_blocks_to_send(self) -> int:
        return len(self.block_ids) - self.num_cached_blocks


class TransferStatus(enum.IntEnum):
    """Ordered lifecycle of one transfer (either side)."""

    WAITING = 0  # reserved, nothing arrived yet (receiver) / registered (sender)
    TRANSFERRING = 1  # some layers moved
    DONE = 2  # every lacking block of every layer plus the first token arrived / were sent
    FAILED = 3  # see `TransferError`; the request's blocks can be freed


class TransferError(enum.Enum):
    """Why a transfer failed."""

    TIMEOUT = "timeout"  # receiver: deadline passed; sender: could not send in time
    ABORTED = "aborted"  # the peer aborted (a local `abort` emits no event)
    INCOMPLETE = "incomplete"  # finish arrived before every lacking block of every layer
    SEND_FAILED = "send_failed"  # sender: queue full, peer unreachable, socket error


@dataclass
class TransferEvent:
    """A transfer ended: `status` is DONE or FAILED.

    On a receiver's DONE, `first_token_id` and `extra` (msgpack-able, e.g. first-token
    logprobs) are what prefill passed to `KVSender.finish`. On DONE, `num_bytes` is the
    request's KV payload (received, or sent: pb `PrefillResponse.kv_bytes_sent`).
    """

    request_id: str
    status: TransferStatus
    error: TransferError | None = None
    detail: str = ""
    first_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    num_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.status is TransferStatus.DONE


class KVReceiver(ABC):
    """Decode side: owns `kv_caches` and writes arriving blocks into them.

    Thread-safety: call every method from one thread (the decode service loop). A ZMQ
    receiver copies frames into the cache on its own thread, under a lock that `abort`
    takes too: once `abort` returns, the request's blocks are never written again. With
    CUDA caches the copies are synchronized before DONE is reported, so decode may read the
    blocks from any stream.

    Counters (monotonic): `num_frames_rejected` (forged token, replay after completion or
    abort, wrong shape/dtype, out-of-range block ids, malformed header), `bytes_received`
    (accepted KV payload bytes), `num_transfers_done`, `num_transfers_failed`.
    """

    num_frames_rejected: int
    bytes_received: int
    num_transfers_done: int
    num_transfers_failed: int

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Address senders use (`KVReservation.endpoint`); resolved after binding."""

    @abstractmethod
    def expect(
        self,
        request_id: str,
        token: bytes,
        block_ids: Sequence[int],
        num_cached_blocks: int,
        deadline_s: float,
    ) -> KVReservation:
        """Register a one-time reservation; return it for prefill (pb `Reservation`).

        `block_ids` are decode's blocks for the whole prompt; only
        `block_ids[num_cached_blocks:]` will be written. The transfer must complete within
        `deadline_s` seconds from now or `poll` reports FAILED/TIMEOUT.
        """

    @abstractmethod
    def poll(self) -> list[TransferEvent]:
        """Expire overdue reservations and return the transfers that ended since last call.

        Never blocks. Each request yields exactly one event (unless aborted locally).
        """

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Drop the reservation (no event); later frames for it are rejected. Idempotent."""

    @abstractmethod
    def close(self) -> None:
        """Stop threads and close sockets. Idempotent."""


class KVSender(ABC):
    """Prefill side: pushes blocks of its own `kv_caches` to decode's reservations.

    Call every method from one thread (the prefill loop; `send_layer` from
    `after_layer(i)`). `send_layer` never waits for the network: it gathers the blocks into
    a staging tensor and queues it (bounded); a background thread, if any, does the rest.
    Prefill may free or reuse its source blocks as soon as `finish` returns. Once a request
    failed (reported by `poll`) or was aborted, `send_layer` / `finish` for it are no-ops, so
    the `after_layer` hook needs no bookkeeping of its own.

    Counters: `bytes_sent` (KV payload bytes handed to the wire), `seconds_sending`
    (wall time the sending path spent), `num_failures` (requests that ended FAILED).
    """

    bytes_sent: int
    seconds_sending: float
    num_failures: int

    @abstractmethod
    def begin(
        self, request_id: str, reservation: KVReservation, src_block_ids: Sequence[int] = ()
    ) -> None:
        """Register a request with prefill's block table so far (`extend` grows it).

        `src_block_ids[i]` maps to `reservation.block_ids[i]`: the table covers the first
        `len(src_block_ids)` blocks of the prompt, at most all of them. Raises ValueError
        when it is longer than the reservation.
        """

    @abstractmethod
    def extend(self, request_id: str, src_block_ids: Sequence[int]) -> None:
        """Replace the request's source block table by a longer (or another) one.

        Chunked prefill allocates blocks chunk by chunk; pass the table before sending a
        chunk's layers. Blocks already sent are never read again, so after a preemption the
        table may name other blocks. No-op for an unknown (failed, aborted) request.
        """

    @abstractmethod
    def send_layer(self, request_id: str, layer: int, blocks: range | None = None) -> None:
        """Queue layer `layer`'s KV of the blocks decode lacks.

        `blocks` are prompt block positions (default: every position the source table
        covers); positions below `num_cached_blocks` are skipped, so with chunked prefill
        pass the chunk's blocks. Raises ValueError for a position the table does not cover.
        A failure (queue full for too long) surfaces as a FAILED event from `poll`.
        """

    @abstractmethod
    def source_blocks(self, request_id: str, blocks: range | None = None) -> list[int]:
        """The source block ids `send_layer(request_id, i, blocks)` reads at every layer
        (tensor-parallel prefill gathers them from all ranks before the layer's hook)."""

    @abstractmethod
    def finish(self, request_id: str, first_token_id: int, extra: dict[str, Any]) -> None:
        """Queue the first token (and msgpack-able `extra`, e.g. logprobs); ends the request.

        `poll` reports DONE once every frame was handed to the wire.
        """

    @abstractmethod
    def poll(self) -> list[TransferEvent]:
        """Return the requests that ended (DONE or FAILED) since last call. Never blocks."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Drop queued frames, tell the receiver (its event: FAILED/ABORTED). No local event."""

    @abstractmethod
    def close(self) -> None:
        """Stop threads and close sockets (pending frames get a bounded linger). Idempotent."""


class KVTransport(ABC):
    """Builds both ends of one kind of transport (in-process fake, ZMQ, ...)."""

    @abstractmethod
    def receiver(self, kv_caches: Sequence[KVCache], bind: str) -> KVReceiver:
        """A receiver writing into `kv_caches`, listening on `bind` (e.g. tcp://0.0.0.0:0)."""

    @abstractmethod
    def sender(self, kv_caches: Sequence[KVCache]) -> KVSender:
        """A sender reading from `kv_caches` (any number of receivers)."""
