"""Readiness and backend metrics against a fake backend, over real REST and gRPC servers.

`/health` and gRPC health follow the backend's `check_health()` (false, hanging or failing
= 503 / NOT_SERVING) while `/live` answers regardless; `/metrics` exports per role exactly
the fields `stats()` reports: a disaggregated backend's prefill and decode, none of the
fields it leaves None, and nothing at all when `stats()` fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from chat.template import ChatTemplate
from chat.tokenizer import Tokenizer
from gateway.app import GatewayConfig, create_app
from gateway.backend import BackendStats, EngineStats, VisionCacheStats
from gateway.metrics import GatewayMetrics
from tests.gateway.test_api_shapes import FakeBackend
from tests.gateway.test_api_shapes import tokenizer as tokenizer
from tests.gateway.test_grpc_api import Servers

HEALTH_TIMEOUT_S = 0.3
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

SPLIT = BackendStats(
    engines=(
        EngineStats(
            role="prefill",
            num_requests_running=2,
            num_kv_blocks_used=7,
            num_kv_blocks_total=100,
            num_prefix_cache_queries=640,
            num_prefix_cache_hits=320,
        ),
        EngineStats(
            role="decode",
            num_requests_running=3,
            num_requests_waiting=1,
            num_kv_blocks_used=25,
            num_kv_blocks_total=50,
        ),
    ),
    num_kv_transfer_failures=4,
    vision=VisionCacheStats(num_hits=9, num_misses=5, num_evictions=2, num_bytes=4096),
)


@dataclass
class ProbedBackend(FakeBackend):
    """The scripted backend plus a health check and `stats()` the test steers."""

    health: str = "ok"
    """ok | down | hang | raise"""
    snapshot: BackendStats | None = None

    async def check_health(self) -> bool:
        if self.health == "hang":
            await asyncio.sleep(60)
        if self.health == "raise":
            raise RuntimeError("probe exploded")
        return self.health == "ok"

    def stats(self) -> BackendStats:
        if self.snapshot is None:
            raise RuntimeError("stats unavailable")
        return self.snapshot


@pytest.fixture(scope="module")
def backend(tokenizer: Tokenizer) -> ProbedBackend:
    return ProbedBackend(tokenizer, snapshot=SPLIT)


@pytest.fixture(scope="module")
def servers(backend: ProbedBackend, tokenizer: Tokenizer) -> Iterator[Servers]:
    config = GatewayConfig(health_timeout_s=HEALTH_TIMEOUT_S)
    srv = Servers(create_app(backend, tokenizer, ChatTemplate(), config))
    srv.grpc.health_poll_s = 0.05
    with srv:
        yield srv


def _until(check: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _grpc_status(servers: Servers) -> int:
    with grpc.insecure_channel(servers.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="tandem.v1.Generation"), timeout=5
        )
    return reply.status


@pytest.mark.parametrize("state", ["down", "hang", "raise"])
def test_health_follows_the_backend_and_live_does_not(
    servers: Servers, backend: ProbedBackend, state: str
) -> None:
    assert httpx.get(f"{servers.url}/health", timeout=5).status_code == 200
    _until(lambda: _grpc_status(servers) == SERVING, "gRPC health never SERVING")
    backend.health = state
    try:
        start = time.monotonic()
        assert httpx.get(f"{servers.url}/health", timeout=5).status_code == 503
        assert time.monotonic() - start < HEALTH_TIMEOUT_S + 2  # a hung probe is bounded
        assert httpx.get(f"{servers.url}/live", timeout=5).status_code == 200
        _until(lambda: _grpc_status(servers) == NOT_SERVING, f"gRPC health ignored {state}")
    finally:
        backend.health = "ok"
    assert httpx.get(f"{servers.url}/health", timeout=5).status_code == 200
    _until(lambda: _grpc_status(servers) == SERVING, "gRPC health did not recover")


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_per_role_from_stats(servers: Servers) -> None:
    r = httpx.get(f"{servers.url}/metrics", timeout=5)
    assert r.status_code == 200
    samples = _samples(r.text)
    prefill, decode = (("role", "prefill"),), (("role", "decode"),)
    assert samples[("tandem:kv_blocks_used", prefill)] == 7
    assert samples[("tandem:kv_blocks_used", decode)] == 25
    assert samples[("tandem:kv_blocks_total", decode)] == 50
    assert samples[("tandem:kv_cache_usage_perc", decode)] == 0.5
    assert samples[("tandem:num_requests_running", prefill)] == 2
    assert samples[("tandem:num_requests_running", decode)] == 3
    assert samples[("tandem:num_requests_waiting", decode)] == 1
    assert samples[("tandem:prefix_cache_queries_total", prefill)] == 640
    assert samples[("tandem:prefix_cache_hits_total", prefill)] == 320
    assert samples[("tandem:kv_transfer_failures_total", ())] == 4
    assert samples[("tandem:vision_cache_hits_total", ())] == 9
    assert samples[("tandem:vision_cache_misses_total", ())] == 5
    assert samples[("tandem:vision_cache_evictions_total", ())] == 2
    assert samples[("tandem:vision_cache_bytes", ())] == 4096
    # Fields decode / prefill leave None are not exported as zeros.
    assert ("tandem:num_requests_waiting", prefill) not in samples
    assert ("tandem:prefix_cache_hits_total", decode) not in samples
    assert ("tandem:prefix_cache_queries_total", decode) not in samples


def _render(backend: ProbedBackend, tokenizer: Tokenizer) -> Samples:
    metrics = GatewayMetrics()
    create_app(backend, tokenizer, ChatTemplate(), metrics=metrics)
    return _samples(metrics.render().decode())


def test_unreported_fields_and_metrics_are_left_out(tokenizer: Tokenizer) -> None:
    bare = BackendStats(engines=(EngineStats(role="decode", num_kv_blocks_used=3),))
    samples = _render(ProbedBackend(tokenizer, snapshot=bare), tokenizer)
    names = {name for name, _ in samples}
    assert samples[("tandem:kv_blocks_used", (("role", "decode"),))] == 3
    for absent in (
        "tandem:num_requests_running",
        "tandem:num_requests_waiting",
        "tandem:kv_blocks_total",
        "tandem:kv_cache_usage_perc",  # needs the total
        "tandem:prefix_cache_hits_total",
        "tandem:kv_transfer_failures_total",  # None: the backend has no KV transfers
        "tandem:vision_cache_hits_total",  # None: no vision service
        "tandem:vision_cache_bytes",
    ):
        assert absent not in names, absent


def test_failing_stats_costs_only_the_backend_metrics(tokenizer: Tokenizer) -> None:
    samples = _render(ProbedBackend(tokenizer, snapshot=None), tokenizer)
    names = {name for name, _ in samples}
    assert not any(
        n.startswith(("tandem:kv_", "tandem:num_requests", "tandem:vision_cache")) for n in names
    )
    assert "tandem:generation_tokens_total" in names
