"""Prometheus metrics of the gateway: HTTP and gRPC traffic, request latencies, and the
backend's state.

* `tandem_http_*` / `tandem_grpc_*`: requests by endpoint (method) and status, HTTP latency.
* `tandem:*` mirror vLLM's / FastDeploy's `vllm:*` / `fastdeploy:*` names: TTFT, inter-token
  and end-to-end latency measured at the gateway for every backend stream (REST and gRPC
  alike, see `RequestTimer`); queue / prefill / KV-transfer / decode / inference time as
  the backend reports them (`RequestTimings`); and, read at each scrape from
  `Backend.stats()`, requests running and waiting, KV blocks in use and prefix-cache tokens
  per engine role (`both` in one process; `prefill` and `decode` when split), KV transfer
  failures, and the vision service's embedding cache. Only what the
  backend measures is exported: no empty stubs, no zeros for fields it does not report.

The registry is per app (not prometheus_client's global one) so tests and several apps in
one process do not collide.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.backend import EngineStats, GenerateDelta, RequestTimings, StatsSource

log = logging.getLogger("tandem.gateway.metrics")

ENDPOINTS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/live", "/metrics"}
)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tandem_http_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "tandem_http_requests_in_flight", "HTTP requests being served", registry=self.registry
        )
        self.latency = Histogram(
            "tandem_http_request_duration_seconds",
            "Time from request to the end of the response (streams included)",
            ["endpoint"],
            registry=self.registry,
        )
        self.grpc_requests = Counter(
            "tandem_grpc_requests",
            "gRPC calls answered, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency_metrics = LatencyMetrics(self.registry)
        self._backend_stats = BackendStatsCollector()
        self.registry.register(self._backend_stats)

    def watch(self, source: StatsSource) -> None:
        """Export `source.stats()` at every scrape (one source; a later call replaces it)."""
        self._backend_stats.source = source

    def request_timer(self) -> RequestTimer:
        """A timer for one backend stream, started now."""
        return RequestTimer(self.latency_metrics)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def endpoint(self, request: Request) -> Response:
        return Response(self.render(), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts every HTTP request; unknown paths share one label to bound cardinality."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500
        start = time.perf_counter()

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, record_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


# vLLM's buckets, so dashboards built for vLLM / FastDeploy read these too.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class LatencyMetrics:
    """Per-request histograms and token counters (one backend stream = one request)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"tandem:{name}", doc, buckets=buckets, registry=registry)

        self.ttft = histogram(
            "time_to_first_token_seconds", "Backend call to first token", _TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between two output tokens", _ITL_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Backend call to last token", _REQUEST_BUCKETS
        )
        self.queue = histogram(
            "request_queue_time_seconds", "Time waiting to be scheduled", _REQUEST_BUCKETS
        )
        self.prefill = histogram(
            "request_prefill_time_seconds", "First scheduled to first token", _REQUEST_BUCKETS
        )
        self.kv_transfer = histogram(
            "request_kv_transfer_time_seconds",
            "Decode's KV reservation to the prompt's KV arriving from prefill",
            _TTFT_BUCKETS,
        )
        self.decode = histogram(
            "request_decode_time_seconds", "First token to last token", _REQUEST_BUCKETS
        )
        self.inference = histogram(
            "request_inference_time_seconds", "Prefill plus decode time", _REQUEST_BUCKETS
        )
        self.prompt_tokens = Counter(
            "tandem:prompt_tokens", "Prompt tokens of started requests", registry=registry
        )
        self.generation_tokens = Counter(
            "tandem:generation_tokens", "Output tokens streamed", registry=registry
        )


class RequestTimer:
    """Times one backend stream from the call to its end; fed every delta it yields."""

    def __init__(self, metrics: LatencyMetrics) -> None:
        self._m = metrics
        self._start = time.perf_counter()
        self._last_token: float | None = None
        self._prefill_s: float | None = None
        self._ended = False

    def on_delta(self, delta: GenerateDelta) -> None:
        now = time.perf_counter()
        if delta.token_ids:
            if self._last_token is None:
                self._m.ttft.observe(now - self._start)
                self._m.prompt_tokens.inc(delta.num_prompt_tokens)
            else:
                gap = (now - self._last_token) / len(delta.token_ids)
                for _ in delta.token_ids:
                    self._m.itl.observe(gap)
            self._last_token = now
            self._m.generation_tokens.inc(len(delta.token_ids))
        if delta.timings is not None:
            self._observe_timings(delta.timings)
        if delta.finished:
            self.end()

    def _observe_timings(self, t: RequestTimings) -> None:
        if t.queue_s is not None:
            self._m.queue.observe(t.queue_s)
        if t.prefill_s is not None:
            self._m.prefill.observe(t.prefill_s)
            self._prefill_s = t.prefill_s
        if t.kv_transfer_s is not None:
            self._m.kv_transfer.observe(t.kv_transfer_s)
        if t.decode_s is not None:
            self._m.decode.observe(t.decode_s)
            if self._prefill_s is not None:
                self._m.inference.observe(self._prefill_s + t.decode_s)

    def end(self) -> None:
        """The stream ended without error (finished, or closed by a stop string or the
        client): observe its end-to-end latency once."""
        if not self._ended and self._last_token is not None:
            self._m.e2e.observe(time.perf_counter() - self._start)
        self._ended = True


_EngineValue = Callable[[EngineStats], float | None]


def _usage(e: EngineStats) -> float | None:
    if e.num_kv_blocks_used is None or not e.num_kv_blocks_total:
        return None
    return e.num_kv_blocks_used / e.num_kv_blocks_total


_ENGINE_GAUGES: tuple[tuple[str, str, _EngineValue], ...] = (
    ("num_requests_running", "Requests in the running batch", lambda e: e.num_requests_running),
    ("num_requests_waiting", "Requests waiting to be scheduled", lambda e: e.num_requests_waiting),
    ("kv_blocks_used", "KV blocks held by requests (0 when idle)", lambda e: e.num_kv_blocks_used),
    ("kv_blocks_total", "KV blocks in the pool", lambda e: e.num_kv_blocks_total),
    ("kv_cache_usage_perc", "Fraction of KV blocks in use, 0 to 1", _usage),
)
_ENGINE_COUNTERS: tuple[tuple[str, str, _EngineValue], ...] = (
    ("prefix_cache_queries", "Prompt tokens looked up", lambda e: e.num_prefix_cache_queries),
    ("prefix_cache_hits", "Prompt tokens found in the cache", lambda e: e.num_prefix_cache_hits),
)


class BackendStatsCollector(Collector):
    """Reads `stats()` of the watched backend at each scrape: per-role gauges and counters.

    A field an engine leaves None gets no sample for that role, and a metric no role
    reports is not exported at all (no zeros standing in for "not measured"). A failing
    `stats()` costs the scrape its backend metrics, never the whole /metrics.
    """

    def __init__(self) -> None:
        self.source: StatsSource | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to declare before a backend is watched

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        try:
            stats = self.source.stats()
        except Exception:
            log.exception("backend stats() failed; its metrics are left out of this scrape")
            return
        families: list[tuple[type[GaugeMetricFamily | CounterMetricFamily], str, str, _EngineValue]]
        families = [(GaugeMetricFamily, *g) for g in _ENGINE_GAUGES]
        families += [(CounterMetricFamily, *c) for c in _ENGINE_COUNTERS]
        for family_type, name, doc, value in families:
            family = family_type(f"tandem:{name}", doc, labels=["role"])
            for engine in stats.engines:
                v = value(engine)
                if v is not None:
                    family.add_metric([engine.role], v)
            if family.samples:
                yield family
        if stats.num_kv_transfer_failures is not None:
            yield CounterMetricFamily(
                "tandem:kv_transfer_failures",
                "KV transfers from prefill to decode that failed",
                value=stats.num_kv_transfer_failures,
            )
        if stats.vision is not None:
            cache = stats.vision
            for name, doc, count in (
                ("hits", "Media found in the vision embedding cache", cache.num_hits),
                ("misses", "Media not in the vision embedding cache", cache.num_misses),
                ("evictions", "Vision embedding cache entries evicted", cache.num_evictions),
            ):
                yield CounterMetricFamily(f"tandem:vision_cache_{name}", doc, value=count)
            yield GaugeMetricFamily(
                "tandem:vision_cache_bytes",
                "Embedding bytes held in the vision cache",
                value=cache.num_bytes,
            )
