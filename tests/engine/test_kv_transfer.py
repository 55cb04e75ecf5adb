"""KV transfer: round trips through the fake and ZMQ (tcp, ipc) transports, security, failures.

Every transport is exercised by the same tests: decode's blocks equal prefill's, only the
blocks decode lacks cross, forged/replayed/bad frames are dropped and counted while the
real transfer completes, a dead sender times out, aborts end both sides, nothing leaks.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import zmq

from engine.kv_transfer import (
    FakeTransport,
    KVCache,
    KVReceiver,
    KVSender,
    TransferError,
    TransferEvent,
    TransferStatus,
    new_transfer_token,
)
from engine.kv_transfer.frames import LayerHeader, encode_header, layer_message
from engine.kv_transfer.zmq_transport import ZmqTransport

L, N, BS, H, D = 4, 24, 4, 2, 8  # layers, blocks, block size, kv heads, head dim
BLOCK_BYTES = BS * H * D * 4  # float32
WAIT_S = 5.0


def make_caches(
    fill: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> list[KVCache]:
    def one() -> torch.Tensor:
        if fill == "zeros":
            return torch.zeros(N, BS, H, D, device=device, dtype=dtype)
        return torch.randn(N, BS, H, D, device=device).to(dtype)

    return [(one(), one()) for _ in range(L)]


@dataclass
class Pair:
    kind: str
    rx: KVReceiver
    tx: KVSender
    src: list[KVCache]
    dst: list[KVCache]

    def inject(self, frames: list[Any]) -> None:
        """Put raw frames on the receiver's wire, as a hostile peer would."""
        if self.kind == "fake":
            self.rx.deliver(frames)  # type: ignore[attr-defined]
            return
        with zmq.Context() as ctx, ctx.socket(zmq.PUSH) as sock:
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(self.rx.endpoint)
            sock.send_multipart(frames)


def wait_until(cond: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def wait_events(side: KVReceiver | KVSender, n: int = 1) -> list[TransferEvent]:
    events: list[TransferEvent] = []

    def got() -> bool:
        events.extend(side.poll())
        return len(events) >= n

    wait_until(got)
    return events


def bind_for(kind: str, tmp_path: Any) -> str:
    return {"fake": "kv", "tcp": "tcp://127.0.0.1:0", "ipc": f"ipc://{tmp_path}/kv.sock"}[kind]


def open_pair(kind: str, tmp_path: Any, device: str = "cpu", **sender_options: Any) -> Pair:
    transport = FakeTransport() if kind == "fake" else ZmqTransport(**sender_options)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    src, dst = make_caches("randn", device, dtype), make_caches("zeros", device, dtype)
    rx = transport.receiver(dst, bind_for(kind, tmp_path))
    return Pair(kind, rx, transport.sender(src), src, dst)


@pytest.fixture(params=["fake", "tcp", "ipc"])
def pair(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Pair]:
    p = open_pair(request.param, tmp_path, send_timeout_s=1.0)
    yield p
    p.tx.close()
    p.rx.close()


DST = [3, 9, 10, 4, 17, 20]  # decode's blocks for a 6-block prompt
SRC = [11, 0, 5, 7, 2, 23]  # prefill's blocks for the same prompt
CACHED = 2  # decode already holds DST[:2]


def transfer(p: Pair, rid: str = "r1", layers: range = range(L), finish: bool = True) -> bytes:
    token = new_transfer_token()
    res = p.rx.expect(rid, token, DST, CACHED, deadline_s=WAIT_S)
    p.tx.begin(rid, res, SRC)
    for i in layers:
        p.tx.send_layer(rid, i)
    if finish:
        p.tx.finish(rid, 42, {"logprobs": [[42, -0.25]]})
    return token


def assert_copied(p: Pair) -> None:
    for (sk, sv), (dk, dv) in zip(p.src, p.dst, strict=True):
        for s, d in zip(SRC[CACHED:], DST[CACHED:], strict=True):
            assert torch.equal(dk[d], sk[s]) and torch.equal(dv[d], sv[s])
        untouched = [b for b in range(N) if b not in DST[CACHED:]]
        assert not dk[untouched].any() and not dv[untouched].any()


def test_round_trip_sends_only_lacking_blocks(pair: Pair) -> None:
    transfer(pair)
    [done] = wait_events(pair.rx)
    assert done.status is TransferStatus.DONE and done.ok
    assert done.first_token_id == 42 and done.extra == {"logprobs": [[42, -0.25]]}
    [sent] = wait_events(pair.tx)
    expected = L * 2 * (len(DST) - CACHED) * BLOCK_BYTES
    assert sent.ok and sent.num_bytes == done.num_bytes == expected
    assert pair.tx.bytes_sent == pair.rx.bytes_received == expected
    assert_copied(pair)
    assert pair.rx.num_frames_rejected == 0 and pair.rx.num_transfers_done == 1


def test_forged_and_replayed_frames_are_rejected(pair: Pair) -> None:
    forged = LayerHeader("r1", b"x" * 16, 0, DST[CACHED:], "float32", [BS, H, D])
    ones = torch.ones(len(DST) - CACHED, BS, H, D)
    token = transfer(pair, layers=range(0), finish=False)
    pair.inject(layer_message(forged, ones, ones))
    wait_until(lambda: pair.rx.num_frames_rejected == 1)
    for i in range(L):
        pair.tx.send_layer("r1", i)
    pair.tx.finish("r1", 42, {})
    assert wait_events(pair.rx)[0].ok
    assert_copied(pair)  # the forged ones never landed
    replay = LayerHeader("r1", token, 0, DST[CACHED:], "float32", [BS, H, D])
    pair.inject(layer_message(replay, ones, ones))  # right token, but the transfer is over
    wait_until(lambda: pair.rx.num_frames_rejected == 2)
    assert_copied(pair)
    assert pair.rx.poll() == []


def bad_messages(token: bytes) -> list[list[Any]]:
    ids, shape = DST[CACHED:], [BS, H, D]
    n = len(ids)
    good = torch.ones(n, BS, H, D)

    def layer(**kw: Any) -> LayerHeader:
        args = dict(request_id="r1", token=token, layer=0, block_ids=ids, dtype="float32")
        return LayerHeader(**{**args, "block_shape": shape, **kw})

    return [
        [b"\x01"],  # truncated header
        [b"\x09" + b"garbage"],  # unknown tag
        [b"\x01\x93\x01\x02"],  # malformed msgpack body
        [b"\x02" + encode_header(layer())[1:]],  # layer body behind a finish tag
        layer_message(layer(dtype="bfloat16"), good, good),  # wrong dtype
        layer_message(layer(block_shape=[BS, H, D * 2]), good, good),  # wrong shape
        layer_message(layer(block_ids=[DST[0], *ids[1:]]), good, good),  # a cached block
        layer_message(layer(block_ids=[N + 5, *ids[1:]]), good, good),  # out of range
        layer_message(layer(layer=L), good, good),  # no such layer
        layer_message(layer(), good[:1], good),  # payload too short
        [encode_header(layer())],  # payload frames missing
        [],  # empty message (fake only: zmq cannot send one)
    ]


def test_bad_frames_are_dropped_and_counted(pair: Pair) -> None:
    token = transfer(pair, layers=range(0), finish=False)
    messages = bad_messages(token) if pair.kind == "fake" else bad_messages(token)[:-1]
    for frames in messages:
        pair.inject(frames)
    wait_until(lambda: pair.rx.num_frames_rejected == len(messages))
    for i in range(L):
        pair.tx.send_layer("r1", i)
    pair.tx.finish("r1", 7, {})
    [done] = wait_events(pair.rx)
    assert done.ok and done.first_token_id == 7
    assert_copied(pair)


def test_dead_sender_times_out_within_deadline(pair: Pair) -> None:
    res = pair.rx.expect("r1", new_transfer_token(), DST, CACHED, deadline_s=0.5)
    start = time.monotonic()
    pair.tx.begin("r1", res, SRC)
    pair.tx.send_layer("r1", 0)
    pair.tx.close()  # prefill dies after one layer
    [failed] = wait_events(pair.rx)
    assert failed.status is TransferStatus.FAILED and failed.error is TransferError.TIMEOUT
    assert 0.5 <= time.monotonic() - start < 1.5
    assert pair.rx.num_transfers_failed == 1


def test_finish_before_every_layer_fails_incomplete(pair: Pair) -> None:
    transfer(pair, layers=range(L - 1))
    [failed] = wait_events(pair.rx)
    assert failed.error is TransferError.INCOMPLETE


def test_receiver_abort_drops_later_frames(pair: Pair) -> None:
    transfer(pair, layers=range(1), finish=False)
    wait_until(lambda: pair.rx.bytes_received > 0)
    pair.rx.abort("r1")
    received = pair.rx.bytes_received
    for i in range(1, L):
        pair.tx.send_layer("r1", i)
    pair.tx.finish("r1", 42, {})
    wait_until(lambda: pair.rx.num_frames_rejected == L)  # L-1 layers + the finish
    assert pair.rx.bytes_received == received and pair.rx.poll() == []
    assert not pair.dst[L - 1][0].any()


def test_sender_abort_fails_receiver_at_once(pair: Pair) -> None:
    transfer(pair, layers=range(2), finish=False)
    pair.tx.abort("r1")
    pair.tx.send_layer("r1", 2)  # no-op once aborted
    [failed] = wait_events(pair.rx)
    assert failed.error is TransferError.ABORTED
    assert pair.tx.poll() == [] and pair.tx.num_failures == 0


def test_fully_cached_prompt_sends_only_the_first_token(pair: Pair) -> None:
    res = pair.rx.expect("r1", new_transfer_token(), DST, len(DST), deadline_s=WAIT_S)
    pair.tx.begin("r1", res, SRC)
    for i in range(L):
        pair.tx.send_layer("r1", i)
    pair.tx.finish("r1", 5, {})
    assert wait_events(pair.rx)[0].first_token_id == 5
    assert pair.tx.bytes_sent == pair.rx.bytes_received == 0


def test_chunked_prefill_sends_blocks_per_chunk(pair: Pair) -> None:
    res = pair.rx.expect("r1", new_transfer_token(), DST, CACHED, deadline_s=WAIT_S)
    pair.tx.begin("r1", res, SRC)
    for chunk in (range(0, 4), range(3, 6)):  # block 3 straddles both chunks
        for i in range(L):
            pair.tx.send_layer("r1", i, chunk)
    pair.tx.finish("r1", 1, {})
    assert wait_events(pair.rx)[0].ok
    assert_copied(pair)


def test_growing_source_table_sends_each_chunk_as_it_comes(pair: Pair) -> None:
    """Chunked prefill: the block table grows chunk by chunk and each chunk leaves at once."""
    res = pair.rx.expect("r1", new_transfer_token(), DST, CACHED, deadline_s=WAIT_S)
    pair.tx.begin("r1", res, SRC[:3])  # first chunk: blocks 0-2 allocated
    with pytest.raises(ValueError, match="extend"):
        pair.tx.send_layer("r1", 0, range(0, 4))  # block 3 has no source yet
    for i in range(L):
        pair.tx.send_layer("r1", i, range(0, 3))
    chunk_bytes = L * 2 * 1 * BLOCK_BYTES  # decode lacks only block 2 of them
    wait_until(lambda: pair.rx.bytes_received == chunk_bytes)
    pair.tx.extend("r1", SRC)  # last chunk
    for i in range(L):
        pair.tx.send_layer("r1", i, range(3, 6))
    pair.tx.finish("r1", 1, {})
    assert wait_events(pair.rx)[0].ok
    assert_copied(pair)
    with pytest.raises(ValueError):
        pair.tx.begin("r2", res, [*SRC, 1])  # longer than the reservation


def test_many_requests_interleaved(pair: Pair) -> None:
    blocks = [[0, 1, 2], [5, 6, 7], [12, 13, 14]]
    for r, ids in enumerate(blocks):
        res = pair.rx.expect(f"r{r}", new_transfer_token(), ids, 0, deadline_s=WAIT_S)
        pair.tx.begin(f"r{r}", res, [b + 1 for b in ids])
    for i in range(L):
        for r in range(len(blocks)):
            pair.tx.send_layer(f"r{r}", i)
    for r in range(len(blocks)):
        pair.tx.finish(f"r{r}", r, {})
    events = wait_events(pair.rx, n=len(blocks))
    assert sorted(e.first_token_id or 0 for e in events) == [0, 1, 2]
    for (sk, _), (dk, _) in zip(pair.src, pair.dst, strict=True):
        for ids in blocks:
            assert torch.equal(dk[ids], sk[[b + 1 for b in ids]])


def test_unreachable_receiver_fails_the_sender(tmp_path: Any) -> None:
    for kind, endpoint in (("fake", "fake://nobody"), ("zmq", f"ipc://{tmp_path}/none")):
        transport = FakeTransport() if kind == "fake" else ZmqTransport(send_timeout_s=0.3)
        tx = transport.sender(make_caches("randn"))
        from engine.kv_transfer import KVReservation

        res = KVReservation(endpoint, tuple(DST), CACHED, new_transfer_token(), BS)
        tx.begin("r1", res, SRC)
        tx.send_layer("r1", 0)
        [failed] = wait_events(tx)
        assert failed.error is TransferError.SEND_FAILED and tx.num_failures == 1
        tx.send_layer("r1", 1)  # no-ops once failed
        tx.finish("r1", 0, {})
        time.sleep(0.05)
        assert tx.poll() == []
        tx.close()


def test_closing_leaks_no_threads_sockets_or_files(tmp_path: Any) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before_fds, before_threads = fds(), threading.active_count()
    for kind in ("tcp", "ipc"):
        for _ in range(2):
            p = open_pair(kind, tmp_path)
            transfer(p)
            assert wait_events(p.rx)[0].ok
            p.tx.close()
            p.rx.close()
            p.rx.close()  # idempotent
    assert threading.active_count() == before_threads
    assert fds() == before_fds
    assert not os.path.exists(tmp_path / "kv.sock")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["fake", "tcp", "ipc"])
def test_round_trip_between_cuda_caches(kind: str, tmp_path: Any) -> None:
    p = open_pair(kind, tmp_path, device="cuda")
    try:
        transfer(p)
        assert wait_events(p.rx)[0].ok
        torch.cuda.synchronize()
        assert_copied(p)
        assert p.tx.bytes_sent == p.rx.bytes_received == L * 2 * 4 * BLOCK_BYTES // 2  # bf16
    finally:
        p.tx.close()
        p.rx.close()
