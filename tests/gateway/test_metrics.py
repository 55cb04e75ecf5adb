"""/metrics of the gateway over the real engine (tiny-ernie-vl on CPU, `LocalBackend`), REST
and gRPC in one loop as `tandem serve` runs them: the vLLM-style latency histograms fill
from both APIs, the engine's state is exported by role, and a client that leaves
mid-stream gives every KV block back (a leak would show as `tandem:kv_blocks_used` > 0).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chat.build_tokenizer import build_tokenizer
from chat.template import ChatTemplate
from chat.tokenizer import Tokenizer
from engine.llm_engine import EngineArgs
from gateway.app import create_app
from gateway.backend import GenerateDelta, RequestTimings
from gateway.metrics import GatewayMetrics
from tandem.local_backend import LocalBackend
from tandem.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.gateway.test_api_shapes import FakeBackend
from tests.gateway.test_grpc_api import Servers, chat

MESSAGES = [{"role": "user", "content": "把李白的静夜思改写为现代诗"}]
HISTOGRAMS = (
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "request_prefill_time_seconds",
    "request_decode_time_seconds",
    "request_inference_time_seconds",
)


@pytest.fixture(scope="module")
def backend() -> Iterator[LocalBackend]:
    b = LocalBackend.create(EngineArgs(max_model_len=512, max_num_seqs=4))
    yield b
    b.shutdown()


@pytest.fixture(scope="module")
def servers(backend: LocalBackend) -> Iterator[Servers]:
    app = create_app(backend, backend.engine.tokenizer, backend.engine.chat_template)
    with Servers(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(servers: Servers) -> Iterator[generation_pb2_grpc.GenerationStub]:
    with grpc.insecure_channel(servers.target) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def scrape(servers: Servers) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    text = httpx.get(f"{servers.url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


BOTH = (("role", "both"),)


def wait_idle(servers: Servers, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(servers)
        busy = (
            samples[("tandem:kv_blocks_used", BOTH)]
            + samples[("tandem:num_requests_running", BOTH)]
        )
        if busy == 0:
            return samples
        assert time.monotonic() < deadline, f"still busy: {busy}"
        time.sleep(0.05)


def test_histograms_and_engine_state_after_requests(servers: Servers, stub) -> None:
    body = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    for _ in range(2):  # the second one hits the prefix cache
        r = httpx.post(f"{servers.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
    replies = list(stub.Generate(chat("你好", max_tokens=3), timeout=60))
    assert replies[-1].delta.usage.completion_tokens == 3
    samples = wait_idle(servers)
    for name in HISTOGRAMS:
        assert samples[(f"tandem:{name}_count", ())] >= 3, name
    assert samples[("tandem:inter_token_latency_seconds_count", ())] >= 3 + 3 + 2
    assert samples[("tandem:generation_tokens_total", ())] >= 4 + 4 + 3
    assert samples[("tandem:kv_blocks_used", BOTH)] == 0
    assert samples[("tandem:num_requests_waiting", BOTH)] == 0
    assert samples[("tandem:kv_blocks_total", BOTH)] > 0
    hits = samples[("tandem:prefix_cache_hits_total", BOTH)]
    assert 0 < hits < samples[("tandem:prefix_cache_queries_total", BOTH)]
    assert samples[("tandem:kv_transfer_failures_total", ())] == 0
    grpc_ok = (("code", "OK"), ("method", "/tandem.v1.Generation/Generate"))
    assert samples[("tandem_grpc_requests_total", grpc_ok)] >= 1


def test_idle_exposition_reads_zero_blocks(servers: Servers) -> None:
    wait_idle(servers)
    text = httpx.get(f"{servers.url}/metrics", timeout=10).text
    assert 'tandem:kv_blocks_used{role="both"} 0.0' in text.splitlines()


def test_grpc_cancel_mid_stream_frees_every_block(servers: Servers, stub) -> None:
    request = generation_pb2.GenerateRequest(
        chat=chat("写一首长诗").chat,
        sampling=common_pb2.SamplingParams(max_tokens=400, ignore_eos=True),
    )
    call = stub.Generate(request, timeout=60)
    for _ in range(3):
        next(call)
    busy = scrape(servers)
    assert busy[("tandem:kv_blocks_used", BOTH)] > 0
    assert busy[("tandem:num_requests_running", BOTH)] == 1
    call.cancel()
    wait_idle(servers)


def test_rest_disconnect_mid_stream_frees_every_block(servers: Servers) -> None:
    body = {"messages": MESSAGES, "stream": True, "max_tokens": 400, "ignore_eos": True}
    with (
        httpx.Client(timeout=60) as c,
        c.stream("POST", f"{servers.url}/v1/chat/completions", json=body) as r,
    ):
        seen = 0
        lines = r.iter_lines()
        for line in lines:
            seen += line.startswith("data: {")
            if seen >= 3:
                break
        # Still connected: leaving `iter_lines` early is what closes httpx's connection.
        assert scrape(servers)[("tandem:kv_blocks_used", BOTH)] > 0
        lines.close()
    wait_idle(servers)


def test_only_measured_metrics_are_exported(tmp_path) -> None:
    """A backend without `stats()` exports no engine gauges; timings come from the deltas."""
    tokenizer = Tokenizer.from_dir(build_tokenizer(tmp_path))
    metrics = GatewayMetrics()
    create_app(FakeBackend(tokenizer), tokenizer, ChatTemplate(), metrics=metrics)
    timer = metrics.request_timer()
    first = RequestTimings(queue_s=0.5, prefill_s=0.25, kv_transfer_s=0.125)
    timer.on_delta(GenerateDelta([1], timings=first))
    timer.on_delta(GenerateDelta([2, 3], finished=True, timings=RequestTimings(decode_s=1.0)))
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert "tandem:kv_blocks_used" not in families
    assert "tandem:num_requests_running" not in families

    def total(name: str) -> float:
        return next(s.value for s in families[name].samples if s.name.endswith("_sum"))

    assert total("tandem:request_queue_time_seconds") == 0.5
    assert total("tandem:request_inference_time_seconds") == 1.25
    assert total("tandem:request_kv_transfer_time_seconds") == 0.125
    count = next(
        s.value
        for s in families["tandem:inter_token_latency_seconds"].samples
        if s.name.endswith("_count")
    )
    assert count == 2  # one gap per token of the second delta
