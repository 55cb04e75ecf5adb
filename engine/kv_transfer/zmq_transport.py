"""KV transfer over ZMQ (tcp:// or ipc://): PUSH from each prefill, PULL on each decode.

Why PUSH/PULL and not DEALER/ROUTER: the data flows one way and decode never answers on
this channel (completion and failure travel over the services' gRPC streams and deadlines),
so a reply path would only add identity frames to parse. A PUSH socket per decode endpoint
keeps the messages of one pipe in order (a FINISH always follows its layers), multipart
messages arrive whole or not at all, and PULL fair-queues many prefills.

Receiver: one background thread polls the PULL socket and hands each message's frames
(zero-copy `zmq.Frame` buffers) to the `ReservationBook`, which validates and copies them
straight into the destination cache blocks. `MAXMSGSIZE` caps what a peer can make it
buffer. Sender: `send_layer` gathers blocks into a staging tensor and queues it (bounded
in bytes); a background thread owns the sockets, copies staging tensors to the host (CUDA)
and sends them without copying (`copy=False`). `IMMEDIATE` plus a small `SNDHWM` keep
messages from piling up for a peer that is gone: a send that cannot start within
`send_timeout_s` fails the request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
import zmq

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

logger = logging.getLogger(__name__)

_POLL_MS = 20  # how often background threads look at their stop flag
_SOCKET_BUFFER = 4 << 20  # kernel socket buffers: fewer wakeups for MiB-sized frames


class ZmqKVReceiver(BookedReceiver):
    """Binds a PULL socket on `bind` (`tcp://host:0` picks a free port)."""

    def __init__(
        self, kv_caches: Sequence[KVCache], bind: str, advertise_host: str | None = None
    ) -> None:
        super().__init__(kv_caches)
        k0 = kv_caches[0][0]
        max_frame = k0.nbytes + (1 << 16)  # one layer's whole K cache plus a header
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVBUF, _SOCKET_BUFFER)
        try:
            # libzmq spells "any free port" as `*`
            self._sock.bind(
                bind[:-2] + ":*" if bind.startswith("tcp://") and bind.endswith(":0") else bind
            )
        except zmq.ZMQError:
            self._sock.close()
            self._ctx.term()
            raise
        endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if advertise_host is not None:
            port = endpoint.rsplit(":", 1)[1]
            endpoint = f"tcp://{advertise_host}:{port}"
        self._endpoint = endpoint
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kv-receiver", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._sock.poll(_POLL_MS, zmq.POLLIN):
                    continue
                frames = self._sock.recv_multipart(copy=False)
            except zmq.ZMQError as e:
                logger.error("KV receiver socket error: %s", e)
                continue
            try:
                self._book.on_message([f.buffer for f in frames])
            except Exception:  # a bug must not silence the receiver; the request times out
                logger.exception("KV receiver failed on a message")

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._sock.close(linger=0)
        self._ctx.term()
        path = self._endpoint.removeprefix("ipc://")
        if path != self._endpoint and not path.startswith("@"):  # libzmq leaves the file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class ZmqKVSender(KVSender):
    """Queues staging tensors; a background thread sends them over per-endpoint PUSH sockets."""

    def __init__(
        self,
        kv_caches: Sequence[KVCache],
        max_queued_bytes: int = 1 << 30,
        enqueue_timeout_s: float = 1.0,
        send_timeout_s: float = 5.0,
        sndhwm: int = 16,
    ) -> None:
        self._outbox = Outbox(kv_caches)
        self.max_queued_bytes = max_queued_bytes
        self.enqueue_timeout_s = enqueue_timeout_s
        self.send_timeout_s = send_timeout_s
        self._sndhwm = sndhwm
        self._cond = threading.Condition()
        self._queue: deque[Outgoing] = deque()  # guarded by _cond, like the fields below
        self._queued_bytes = 0
        self._failed: set[str] = set()
        self._events: list[TransferEvent] = []
        self._closing = False
        self.bytes_sent = 0
        self.seconds_sending = 0.0
        self.num_failures = 0
        self._ctx = zmq.Context()
        self._socks: dict[str, zmq.Socket[Any]] = {}  # owned by the thread
        self._stream: Any = None
        self._thread = threading.Thread(target=self._loop, name="kv-sender", daemon=True)
        self._thread.start()

    # ---- prefill thread ----

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
            self._enqueue(msg)

    def finish(self, request_id: str, first_token_id: int, extra: dict[str, Any]) -> None:
        msg = self._outbox.finish(request_id, first_token_id, extra)
        if msg is not None:
            self._enqueue(msg)

    def abort(self, request_id: str) -> None:
        msg = self._outbox.abort(request_id, "aborted by prefill")
        with self._cond:
            self._drop_queued(request_id)
            if msg is not None and request_id not in self._failed:
                msg.last = False  # no DONE event for an abort
                self._queue.append(msg)
                self._cond.notify_all()

    def poll(self) -> list[TransferEvent]:
        with self._cond:
            events, self._events = self._events, []
            for e in events:
                if e.status is TransferStatus.FAILED:
                    self._drop_queued(e.request_id)
                    self._failed.discard(e.request_id)
        for e in events:
            if e.status is TransferStatus.FAILED:
                self._outbox.abort(e.request_id)  # forget it: later calls are no-ops
        return events

    def close(self, linger_s: float = 1.0) -> None:
        """Wait up to `linger_s` for queued messages to go out, then stop and close."""
        with self._cond:
            if self._closing:
                return
            self._cond.wait_for(lambda: not self._queue, timeout=linger_s)
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0 + self.send_timeout_s)
        for sock in self._socks.values():
            sock.close(linger=int(linger_s * 1000))
        self._socks.clear()
        self._ctx.term()

    def _enqueue(self, msg: Outgoing) -> None:
        with self._cond:
            if msg.request_id in self._failed:
                return

            def fits() -> bool:
                return not self._queue or self._queued_bytes + msg.nbytes <= self.max_queued_bytes

            if not self._cond.wait_for(fits, timeout=self.enqueue_timeout_s):
                self._fail_locked(msg.request_id, "send queue full")
                return
            self._queue.append(msg)
            self._queued_bytes += msg.nbytes
            self._cond.notify_all()

    def _drop_queued(self, request_id: str) -> None:
        kept = [m for m in self._queue if m.request_id != request_id]
        self._queued_bytes = sum(m.nbytes for m in kept)
        self._queue = deque(kept)

    def _fail_locked(self, request_id: str, detail: str) -> None:
        if request_id in self._failed:
            return
        self._failed.add(request_id)
        self._drop_queued(request_id)
        self.num_failures += 1
        self._events.append(
            TransferEvent(request_id, TransferStatus.FAILED, TransferError.SEND_FAILED, detail)
        )

    # ---- sender thread ----

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing, timeout=0.1)
                if self._closing:
                    return
                if not self._queue:
                    continue
                msg = self._queue[0]
            error = self._send(msg)
            with self._cond:
                if not (self._queue and self._queue[0] is msg):
                    continue  # aborted or failed while on the wire: already accounted for
                self._queue.popleft()
                self._queued_bytes -= msg.nbytes
                if error:
                    self._fail_locked(msg.request_id, error)
                elif msg.last:
                    done = TransferEvent(
                        msg.request_id, TransferStatus.DONE, num_bytes=msg.request_bytes
                    )
                    self._events.append(done)
                self._cond.notify_all()

    def _send(self, msg: Outgoing) -> str | None:
        """Put one message on the wire; return why it failed, or None."""
        start = time.perf_counter()
        try:
            sock = self._socket(msg.endpoint)
            if msg.tensors and msg.tensors[0].is_cuda and self._stream is None:
                self._stream = torch.cuda.Stream(device=msg.tensors[0].device)
            frames = host_frames(msg, self._stream)
            if not self._wait_writable(sock):
                return f"{msg.endpoint} not accepting within {self.send_timeout_s}s"
            sock.send_multipart(frames, copy=False)
        except (zmq.ZMQError, RuntimeError) as e:
            return f"send to {msg.endpoint} failed: {e}"
        finally:
            self.seconds_sending += time.perf_counter() - start
        self.bytes_sent += msg.nbytes
        return None

    def _wait_writable(self, sock: zmq.Socket[Any]) -> bool:
        """Wait up to `send_timeout_s` for room on `sock`, in slices so close() is prompt."""
        deadline = time.monotonic() + self.send_timeout_s
        while not self._closing and time.monotonic() < deadline:
            if sock.poll(_POLL_MS, zmq.POLLOUT):
                return True
        return False

    def _socket(self, endpoint: str) -> zmq.Socket[Any]:
        sock = self._socks.get(endpoint)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only for a connected peer
            sock.setsockopt(zmq.SNDHWM, self._sndhwm)
            sock.setsockopt(zmq.SNDBUF, _SOCKET_BUFFER)
            sock.connect(endpoint)
            self._socks[endpoint] = sock
        return sock


class ZmqTransport(KVTransport):
    """Builds ZMQ receivers and senders with shared settings."""

    def __init__(self, advertise_host: str | None = None, **sender_options: Any) -> None:
        self.advertise_host = advertise_host
        self.sender_options = sender_options

    def receiver(self, kv_caches: Sequence[KVCache], bind: str) -> ZmqKVReceiver:
        return ZmqKVReceiver(kv_caches, bind, self.advertise_host)

    def sender(self, kv_caches: Sequence[KVCache]) -> ZmqKVSender:
        return ZmqKVSender(kv_caches, **self.sender_options)
