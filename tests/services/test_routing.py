"""Capacity and routing across processes: decode's `max_num_seqs`, several decode
instances behind one `GrpcBackend`, per-role stats and health."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from gateway.backend import GenerateRequest
from gateway.errors import OverloadedError
from tandem import pb
from tandem.v1 import engine_pb2, engine_pb2_grpc
from tests.services.conftest import EnginePair, free_port, run, start_service, wait_serving
from tests.services.test_engine_services import (
    GREEDY,
    collect,
    make_backend,
    prompt_ids,
    stats,
    wait_idle,
)


@asynccontextmanager
async def holding(target: str, count: int, tag: str) -> AsyncIterator[list[Any]]:
    """`count` reservations on a decode that no prefill ever fills (cancelled on exit)."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = engine_pb2_grpc.DecodeStub(ch)
        prompt = engine_pb2.EnginePrompt(
            token_ids=prompt_ids(20), sampling=pb.sampling_to_pb({"temperature": 0.0})
        )
        calls = []
        try:
            for i in range(count):
                request = engine_pb2.DecodeRequest(
                    request_id=f"{tag}{i}", prompt=prompt, transfer_timeout_s=60
                )
                calls.append(stub.Generate(request))
                assert (await calls[-1].read()).WhichOneof("event") == "reserved"
            yield calls
        finally:
            for call in calls:
                call.cancel()


@pytest.fixture(scope="module")
def small_decode(pair: EnginePair) -> str:
    """A second decode that holds one request at most."""
    svc = start_service("decode", pair.tmp, "--max-model-len", "1024", "--max-num-seqs", "1")
    pair.extra.append(svc)  # stopped with the pair
    wait_serving([svc])
    return svc.target


def test_full_decode_is_resource_exhausted_at_once(pair: EnginePair) -> None:
    async def go() -> None:
        async with holding(pair.decode.target, 4, "full"):  # max_num_seqs 4, blocks to spare
            s = await stats(pair.decode.target, engine_pb2_grpc.DecodeStub)
            assert (s.num_requests_waiting, s.max_num_seqs) == (4, 4)
            backend = make_backend(pair)
            try:
                start = time.monotonic()
                with pytest.raises(OverloadedError, match="max_num_seqs"):
                    await collect(backend, GenerateRequest("fifth", prompt_ids(20), GREEDY))
                assert time.monotonic() - start < 5
            finally:
                await backend.close()
        await wait_idle(pair)

    run(go())


def test_backend_routes_around_a_full_decode(pair: EnginePair, small_decode: str) -> None:
    async def go() -> None:
        backend = make_backend(pair, decode=(small_decode, pair.decode.target))
        try:
            async with holding(small_decode, 1, "small"):
                # no stats yet: round-robin puts the full one first for the first request
                for i in range(2):
                    got = await collect(backend, GenerateRequest(f"rr{i}", prompt_ids(20), GREEDY))
                    assert got[-1].finished and got[-1].num_output_tokens == 12
                await backend.refresh_stats()  # now the load ranks the full one last
                for _ in range(2):
                    assert backend._decodes.ranked()[0].target == pair.decode.target
                async with holding(pair.decode.target, 4, "busy"):
                    start = time.monotonic()
                    with pytest.raises(OverloadedError, match=r"every decode instance \(2\)"):
                        await collect(backend, GenerateRequest("no", prompt_ids(20), GREEDY))
                    assert time.monotonic() - start < 5
            small = await stats(small_decode, engine_pb2_grpc.DecodeStub)
            assert (small.num_used_blocks, small.num_requests, small.kv_bytes) == (0, 0, 0)
        finally:
            await backend.close()
        await wait_idle(pair)

    run(go())


def test_stats_per_role_and_health(pair: EnginePair) -> None:
    async def go() -> None:
        backend = make_backend(pair)
        try:
            await collect(backend, GenerateRequest("st", prompt_ids(40, seed=9), GREEDY))
            await backend.refresh_stats()
            got = {e.role: e for e in backend.stats().engines}
            assert set(got) == {"prefill", "decode"}
            for e in got.values():
                assert e.num_kv_blocks_used == 0 and (e.num_kv_blocks_total or 0) > 0
                assert e.num_requests_running == e.num_requests_waiting == 0
                assert (e.num_prefix_cache_queries or 0) >= 40
            assert backend.stats().num_kv_transfer_failures is not None
            assert await backend.check_health()
        finally:
            await backend.close()
        dead_vision = make_backend(pair, vision=f"127.0.0.1:{free_port()}")
        try:
            assert not await dead_vision.check_health()  # a configured service is down
        finally:
            await dead_vision.close()

    run(go())
