"""KV transfer wire format and receiver robustness: headers round-trip, garbage never crashes
the receiver, the sender's queue is bounded."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from engine.kv_transfer import KVReservation, TransferError, new_transfer_token
from engine.kv_transfer.frames import (
    AbortHeader,
    FinishHeader,
    FrameError,
    LayerHeader,
    buffer_tensor,
    decode_header,
    encode_header,
    tensor_buffer,
)
from engine.kv_transfer.reservations import ReservationBook
from engine.kv_transfer.zmq_transport import ZmqKVSender


def caches(n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(n, 2, 1, 4), torch.zeros(n, 2, 1, 4)) for _ in range(2)]


@pytest.mark.parametrize(
    "header",
    [
        LayerHeader("r", b"t" * 16, 3, [1, 2], "bfloat16", [16, 4, 128]),
        FinishHeader("r", b"t" * 16, 7, {"logprobs": [[7, -0.5]]}),
        AbortHeader("r", b"t" * 16, "bye"),
    ],
)
def test_headers_round_trip(header: Any) -> None:
    assert decode_header(encode_header(header)) == header


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_tensor_buffers_are_zero_copy(dtype: torch.dtype) -> None:
    t = torch.randn(3, 2, 4).to(dtype)
    view = tensor_buffer(t)
    back = buffer_tensor(view, dtype, [3, 2, 4])
    assert torch.equal(back, t) and back.data_ptr() == t.data_ptr()
    with pytest.raises(FrameError):
        buffer_tensor(view, dtype, [3, 2, 5])


@given(st.lists(st.binary(max_size=64), max_size=4))
def test_receiver_survives_garbage(frames: list[bytes]) -> None:
    book = ReservationBook(caches())
    book.expect("r", b"t" * 16, [0, 1, 2], 0, deadline_s=10.0)
    book.on_message(frames)  # never raises
    assert book.num_frames_rejected == 1 and book.bytes_received == 0


@given(
    layer=st.integers(-3, 5),
    ids=st.lists(st.integers(-2, 10), max_size=4),
    shape=st.lists(st.integers(0, 5), max_size=4),
)
def test_receiver_rejects_any_bad_layer(layer: int, ids: list[int], shape: list[int]) -> None:
    book = ReservationBook(caches())
    book.expect("r", b"t" * 16, [0, 1, 2], 1, deadline_s=10.0)
    payload = torch.ones(len(ids), 2, 1, 4)
    header = LayerHeader("r", b"t" * 16, layer, ids, "float32", shape)
    book.on_message([encode_header(header), tensor_buffer(payload), tensor_buffer(payload)])
    valid = 0 <= layer < 2 and shape == [2, 1, 4] and ids and set(ids) <= {1, 2}
    valid = valid and len(set(ids)) == len(ids)
    assert book.num_frames_rejected == (0 if valid else 1)
    assert (book.bytes_received > 0) == bool(valid)


def test_expect_rejects_bad_reservations() -> None:
    book = ReservationBook(caches())
    with pytest.raises(ValueError):
        book.expect("r", b"t" * 16, [0, 8], 0, 1.0)  # out of range
    with pytest.raises(ValueError):
        book.expect("r", b"t" * 16, [1, 1], 0, 1.0)  # repeated
    book.expect("r", b"t" * 16, [1, 2], 0, 1.0)
    with pytest.raises(ValueError):
        book.expect("r", b"t" * 16, [3], 0, 1.0)  # same request twice


def test_sender_queue_is_bounded(tmp_path: Any) -> None:
    """A peer that never reads: the queue fills, the request fails, nothing blocks long."""
    tx = ZmqKVSender(caches(), max_queued_bytes=64, enqueue_timeout_s=0.1, send_timeout_s=2.0)
    res = KVReservation(f"ipc://{tmp_path}/none", (0, 1, 2), 0, new_transfer_token(), 2)
    tx.begin("r", res, [3, 4, 5])
    start = time.monotonic()
    tx.send_layer("r", 0)  # on the wire (waiting for a peer)
    tx.send_layer("r", 1)  # does not fit: fails after enqueue_timeout_s
    assert time.monotonic() - start < 1.0
    [failed] = tx.poll()
    assert failed.error is TransferError.SEND_FAILED and "queue full" in failed.detail
    tx.close(linger_s=0.0)
