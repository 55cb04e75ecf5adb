"""prefill_svc + decode_svc as real processes: parity, cancellation, capacity, forged KV."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import zmq
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chat.multimodal import MediaTokens
from chat.tokenizer import Tokenizer
from engine.kv_transfer.frames import LayerHeader, encode_header
from engine.llm_engine import EngineArgs, LLMEngine, resolve_model_path
from engine.sampling_params import SamplingParams
from gateway.backend import GenerateDelta, GenerateRequest, SamplingOptions
from gateway.errors import OverloadedError
from tandem import pb
from tandem.grpc_backend import GrpcBackend, GrpcBackendConfig
from tandem.v1 import engine_pb2, engine_pb2_grpc
from tests.services.conftest import EnginePair, run

GREEDY = SamplingOptions(temperature=0.0, max_tokens=12)


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    """Plain text token ids (no media placeholders or markers)."""
    return [int(x) for x in np.random.default_rng(seed).integers(300, 2000, n)]


@pytest.fixture(scope="module")
def reference() -> Callable[[list[int], int], list[int]]:
    """Greedy tokens of the in-process engine (role `both`, what --colocate runs)."""
    engine = LLMEngine(EngineArgs(max_model_len=1024, max_num_seqs=4))

    def generate(ids: list[int], max_tokens: int) -> list[int]:
        engine.add_request(
            f"ref-{time.monotonic_ns()}", ids, SamplingParams(temperature=0, max_tokens=max_tokens)
        )
        out: list[int] = []
        while engine.has_unfinished_requests():
            for o in engine.step():
                out += o.new_token_ids
        return out

    return generate


def make_backend(pair: EnginePair, **kw: Any) -> GrpcBackend:
    tokens = MediaTokens.from_tokenizer(Tokenizer.from_dir(resolve_model_path("tiny-ernie-vl")))
    targets = {"prefill": (pair.prefill.target,), "decode": (pair.decode.target,)}
    return GrpcBackend(GrpcBackendConfig(**{**targets, "max_model_len": 1024, **kw}), tokens)


async def collect(backend: GrpcBackend, req: GenerateRequest) -> list[GenerateDelta]:
    return [d async for d in backend.generate(req)]


async def stats(target: str, stub_cls: Any) -> engine_pb2.EngineStats:
    async with grpc.aio.insecure_channel(target) as ch:
        return await stub_cls(ch).Stats(engine_pb2.StatsRequest(), timeout=5)


async def wait_idle(pair: EnginePair, timeout_s: float = 10.0) -> None:
    """Both sides end with zero blocks in use and no request held."""
    deadline = time.monotonic() + timeout_s
    while True:
        p = await stats(pair.prefill.target, engine_pb2_grpc.PrefillStub)
        d = await stats(pair.decode.target, engine_pb2_grpc.DecodeStub)
        held = (p.num_used_blocks, p.num_requests, d.num_used_blocks, d.num_requests)
        if held == (0, 0, 0, 0):
            return
        assert time.monotonic() < deadline, f"still held (prefill blocks, reqs, decode ...): {held}"
        await asyncio.sleep(0.1)


def test_health_and_reflection(pair: EnginePair) -> None:
    for svc, name in ((pair.prefill, "tandem.v1.Prefill"), (pair.decode, "tandem.v1.Decode")):
        with grpc.insecure_channel(svc.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", name):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
            names = {s.name for s in reply.list_services_response.service}
            assert {name, "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("length", [40, 150])  # 150 > prefill's 32-token step: chunked
def test_greedy_matches_colocated_engine(pair: EnginePair, reference: Any, length: int) -> None:
    ids = prompt_ids(length, seed=length)

    async def go() -> list[GenerateDelta]:
        backend = make_backend(pair)
        try:
            return await collect(backend, GenerateRequest(f"g{length}", ids, GREEDY))
        finally:
            await backend.close()

    deltas = run(go())
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == reference(ids, 12)
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert deltas[-1].num_prompt_tokens == length and deltas[-1].num_output_tokens == 12
    run(wait_idle(pair))


def test_prefix_cache_sends_only_missing_blocks(pair: EnginePair) -> None:
    ids = prompt_ids(100, seed=7)

    async def go() -> tuple[int, int, list[int], list[int], int]:
        backend = make_backend(pair)
        try:
            before = (await stats(pair.decode.target, engine_pb2_grpc.DecodeStub)).kv_bytes
            first = await collect(backend, GenerateRequest("pc1", ids, GREEDY))
            middle = (await stats(pair.decode.target, engine_pb2_grpc.DecodeStub)).kv_bytes
            second = await collect(backend, GenerateRequest("pc2", ids, GREEDY))
            after = (await stats(pair.decode.target, engine_pb2_grpc.DecodeStub)).kv_bytes
            tok = lambda ds: [t for d in ds for t in d.token_ids]  # noqa: E731
            return (
                middle - before,
                after - middle,
                tok(first),
                tok(second),
                second[-1].num_cached_tokens,
            )
        finally:
            await backend.close()

    sent_first, sent_second, a, b, cached = run(go())
    assert a == b
    assert cached == 96  # prefill's prefix cache: 6 full blocks of 16
    assert 0 < sent_second < sent_first  # decode held 6 blocks: only the last one moved
    run(wait_idle(pair))


def test_cancel_mid_prefill_frees_both_sides(pair: EnginePair) -> None:
    ids = prompt_ids(700, seed=3)  # 22 prefill steps of 32 tokens

    async def go() -> None:
        backend = make_backend(pair)
        try:
            task = asyncio.create_task(collect(backend, GenerateRequest("cp", ids, GREEDY)))
            deadline = time.monotonic() + 10
            while (await stats(pair.prefill.target, engine_pb2_grpc.PrefillStub)).num_requests == 0:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_idle(pair)
        finally:
            await backend.close()

    run(go())


def test_cancel_mid_decode_frees_both_sides(pair: EnginePair) -> None:
    opts = SamplingOptions(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def go() -> None:
        backend = make_backend(pair)
        try:
            stream = backend.generate(GenerateRequest("cd", prompt_ids(30, seed=5), opts))
            got = [await anext(stream) for _ in range(3)]
            assert not got[-1].finished
            await stream.aclose()
            await wait_idle(pair)
        finally:
            await backend.close()

    run(go())


def test_no_blocks_is_resource_exhausted_at_once(pair: EnginePair) -> None:
    async def go() -> None:
        backend = make_backend(pair)
        try:
            start = time.monotonic()
            with pytest.raises(OverloadedError):  # 1000 tokens need 63 blocks; decode has 48
                await collect(backend, GenerateRequest("big", prompt_ids(1000), GREEDY))
            assert time.monotonic() - start < 5
            ok = await collect(backend, GenerateRequest("small", prompt_ids(20), GREEDY))
            assert ok[-1].finished
            await wait_idle(pair)
        finally:
            await backend.close()

    run(go())


def test_forged_kv_frame_is_rejected_and_counted(pair: EnginePair) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(pair.decode.target) as ch:
            decode = engine_pb2_grpc.DecodeStub(ch)
            before = (await decode.Stats(engine_pb2.StatsRequest())).num_frames_rejected
            prompt = engine_pb2.EnginePrompt(
                token_ids=prompt_ids(40), sampling=pb.sampling_to_pb({"temperature": 0.0})
            )
            call = decode.Generate(
                engine_pb2.DecodeRequest(request_id="forged", prompt=prompt, transfer_timeout_s=30)
            )
            reserved = (await call.read()).reserved
            header = LayerHeader(
                request_id="forged",
                token=b"\x00" * 16,  # not the one-time token decode handed out
                layer=0,
                block_ids=list(reserved.block_ids[:1]),
                dtype="float32",
                block_shape=[reserved.block_size, 1, 1],
            )
            k = torch.zeros(1, reserved.block_size, 1, 1)
            ctx = zmq.Context()
            sock = ctx.socket(zmq.PUSH)
            sock.connect(reserved.kv_endpoint)
            sock.send_multipart([encode_header(header), k.numpy().tobytes(), k.numpy().tobytes()])
            deadline = time.monotonic() + 10
            while (await decode.Stats(engine_pb2.StatsRequest())).num_frames_rejected == before:
                assert time.monotonic() < deadline, "the forged frame was not counted"
                await asyncio.sleep(0.05)
            sock.close(linger=0)
            ctx.term()
            call.cancel()
        await wait_idle(pair)

    run(go())


async def _stream_text(pair: EnginePair, ids: list[int], parser: str, **sampling: Any) -> Any:
    """Decode.Generate + Prefill.Prefill by hand; returns the deltas."""
    async with (
        grpc.aio.insecure_channel(pair.decode.target) as dch,
        grpc.aio.insecure_channel(pair.prefill.target) as pch,
    ):
        prompt = engine_pb2.EnginePrompt(token_ids=ids, sampling=pb.sampling_to_pb(sampling))
        rid = f"t{time.monotonic_ns()}"
        call = engine_pb2_grpc.DecodeStub(dch).Generate(
            engine_pb2.DecodeRequest(request_id=rid, prompt=prompt, reasoning_parser=parser)
        )
        first = await call.read()
        request = engine_pb2.PrefillRequest(
            request_id=rid, prompt=prompt, reservation=first.reserved
        )
        await engine_pb2_grpc.PrefillStub(pch).Prefill(request, timeout=30)
        deltas = []
        while (msg := await call.read()) is not grpc.aio.EOF:
            deltas.append(msg.delta)
        return deltas


def test_deltas_carry_text_and_usage(pair: EnginePair) -> None:
    tokenizer = Tokenizer.from_dir(resolve_model_path("tiny-ernie-vl"))
    ids = prompt_ids(30, seed=11)
    deltas = run(_stream_text(pair, ids, "", temperature=0.0, max_tokens=10))
    tokens = [t for d in deltas for t in d.token_ids]
    assert "".join(d.text for d in deltas) == tokenizer.decode(tokens, skip_special_tokens=True)
    assert deltas[-1].usage.completion_tokens == 10 and deltas[-1].usage.prompt_tokens == 30
    run(wait_idle(pair))


def test_stop_string_and_reasoning_split_on_decode(pair: EnginePair) -> None:
    tokenizer = Tokenizer.from_dir(resolve_model_path("tiny-ernie-vl"))
    think = tokenizer.token_to_id("<think>")
    ids = [*prompt_ids(20, seed=12), think]  # the prompt opens the reasoning
    free = run(_stream_text(pair, ids, "ernie-45-vl", temperature=0.0, max_tokens=10))
    text = "".join(d.reasoning_text for d in free)
    assert text and not "".join(d.text for d in free)  # all reasoning: no </think> yet
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = run(
        _stream_text(pair, ids, "ernie-45-vl", temperature=0.0, max_tokens=10, stop=[stop])
    )
    got = "".join(d.reasoning_text for d in stopped)
    assert got == text[: text.index(stop)] and stop not in got
    assert (
        stopped[-1].finish_reason == pb.FINISH_REASONS["stop"] and stopped[-1].stop_reason == stop
    )
    run(wait_idle(pair))


def test_image_without_vision_service_prefill_encodes(pair: EnginePair) -> None:
    """No vision endpoint: the backend ships pixels and prefill runs the vision tower."""
    import io

    from PIL import Image

    from engine.multimodal import MediaInput
    from gateway.backend import MediaItem

    buf = io.BytesIO()
    Image.new("RGB", (56, 84), (20, 130, 90)).save(buf, format="PNG")
    item = MediaItem("image", buf.getvalue())
    tokens = MediaTokens.from_tokenizer(Tokenizer.from_dir(resolve_model_path("tiny-ernie-vl")))

    async def go() -> tuple[list[int], list[int], Any]:
        backend = make_backend(pair)
        try:
            encoded = await backend.encode_media(item)
            ids = [
                *prompt_ids(10, seed=21),
                tokens.image_start_id,
                *[tokens.image_token_id] * encoded.num_tokens,
                tokens.image_end_id,
                *prompt_ids(5, seed=22),
            ]
            req = GenerateRequest("img", ids, GREEDY, media=[encoded])
            deltas = await collect(backend, req)
            return ids, [t for d in deltas for t in d.token_ids], encoded
        finally:
            await backend.close()

    ids, got, encoded = run(go())
    engine = LLMEngine(EngineArgs(max_model_len=1024, max_num_seqs=4))
    pixels = pb.tensor_to_torch(encoded.payload.pixel_values)
    media = [MediaInput("image", pixels, encoded.grid, encoded.content_hash)]
    engine.add_request("ref", ids, SamplingParams(temperature=0, max_tokens=12), media)
    want: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            want += o.new_token_ids
    assert got == want
    run(wait_idle(pair))
