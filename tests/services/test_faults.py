"""Faults across processes: decode killed mid-stream, prefill shut down with SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.backend import GenerateRequest, SamplingOptions
from gateway.errors import GatewayError
from tandem.v1 import engine_pb2, engine_pb2_grpc
from tests.services.conftest import (
    MODEL_FLAGS,
    EnginePair,
    run,
    sigterm,
    start_service,
    wait_serving,
)
from tests.services.test_engine_services import make_backend, prompt_ids, stats

LONG = SamplingOptions(temperature=0.0, max_tokens=400, ignore_eos=True)


@pytest.fixture
def own_pair(tmp_path: Path) -> Iterator[EnginePair]:
    prefill = start_service("prefill", tmp_path, *MODEL_FLAGS)
    decode = start_service("decode", tmp_path, *MODEL_FLAGS)
    pair = EnginePair(prefill, decode, tmp_path)
    try:
        wait_serving([prefill, decode])
        yield pair
    finally:
        pair.stop()


def test_kill_decode_mid_stream(own_pair: EnginePair) -> None:
    pair = own_pair

    async def stream_until_killed() -> float:
        backend = make_backend(pair)
        try:
            stream = backend.generate(GenerateRequest("k1", prompt_ids(60), LONG))
            for _ in range(3):
                await anext(stream)
            pair.decode.proc.kill()  # kill -9
            killed = time.monotonic()
            with pytest.raises(GatewayError):
                async for _ in stream:
                    pass
            return time.monotonic() - killed
        finally:
            await backend.close()

    assert run(stream_until_killed()) < 5.0

    async def prefill_idle() -> None:
        deadline = time.monotonic() + 10
        while True:
            s = await stats(pair.prefill.target, engine_pb2_grpc.PrefillStub)
            if (s.num_used_blocks, s.num_requests) == (0, 0):
                return
            assert time.monotonic() < deadline, f"prefill still holds {s}"
            await asyncio.sleep(0.1)

    run(prefill_idle())
    pair.decode.proc.wait(10)
    pair.decode = start_service("decode", pair.tmp, *MODEL_FLAGS)
    wait_serving([pair.decode])

    async def next_request() -> int:
        backend = make_backend(pair)
        try:
            req = GenerateRequest(
                "k2", prompt_ids(60), SamplingOptions(temperature=0.0, max_tokens=5)
            )
            deltas = [d async for d in backend.generate(req)]
            return deltas[-1].num_output_tokens
        finally:
            await backend.close()

    assert run(next_request()) == 5


def test_sigterm_finishes_in_flight_then_refuses_new_work(own_pair: EnginePair) -> None:
    async def in_flight() -> int:
        backend = make_backend(own_pair)
        try:
            opts = SamplingOptions(temperature=0.0, max_tokens=40, ignore_eos=True)
            stream = backend.generate(GenerateRequest("t1", prompt_ids(30), opts))
            await anext(stream)
            own_pair.decode.proc.send_signal(signal.SIGTERM)  # mid-stream
            return [d async for d in stream][-1].num_output_tokens
        finally:
            await backend.close()

    assert run(in_flight()) == 40  # the stream in flight finished within the grace period
    assert own_pair.decode.proc.wait(30) == 0
    assert sigterm(own_pair.prefill) == 0

    async def refused() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(own_pair.decode.target) as ch:
            try:
                await engine_pb2_grpc.DecodeStub(ch).Stats(engine_pb2.StatsRequest(), timeout=2)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    assert run(refused()) == grpc.StatusCode.UNAVAILABLE
