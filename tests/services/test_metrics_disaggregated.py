"""/metrics of a gateway over real services: decode's KV transfer time per request, and the
vision service's embedding cache counters (its `Stats` RPC, read by `GrpcBackend`)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from chat.multimodal import MediaTokens
from chat.template import ChatTemplate
from chat.tokenizer import Tokenizer
from engine.llm_engine import resolve_model_path
from gateway.app import create_app
from gateway.metrics import GatewayMetrics
from tandem.grpc_backend import GrpcBackend, GrpcBackendConfig
from tandem.v1 import vision_pb2, vision_pb2_grpc
from tests.services.conftest import EnginePair, Service, run, start_service, wait_serving


@pytest.fixture(scope="module")
def vision(pair: EnginePair) -> Iterator[Service]:
    svc = start_service("vision", pair.tmp, "--preprocess-workers", "1")
    try:
        wait_serving([svc])
        yield svc
    finally:
        svc.kill()


def _image_url(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (56, 84), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _samples(text: str) -> dict[str, float]:
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels  # unlabelled: counters, gauges, histograms' _count and _sum
    }


async def _serve_and_scrape(pair: EnginePair, vision: str | None, contents: list[Any]) -> str:
    """A gateway over a `GrpcBackend`: one chat completion per item, then /metrics."""
    path = resolve_model_path("tiny-ernie-vl")
    tokenizer = Tokenizer.from_dir(path)
    config = GrpcBackendConfig(
        prefill=(pair.prefill.target,),
        decode=(pair.decode.target,),
        vision=vision,
        max_model_len=1024,
    )
    backend = GrpcBackend(config, MediaTokens.from_tokenizer(tokenizer))
    metrics = GatewayMetrics()
    app = create_app(backend, tokenizer, ChatTemplate(), metrics=metrics)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            for content in contents:
                body = {
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": 4,
                    "temperature": 0,
                }
                r = await client.post("/v1/chat/completions", json=body, timeout=60)
                assert r.status_code == 200, r.text
            await backend.refresh_stats()
            r = await client.get("/metrics", timeout=10)
            assert r.status_code == 200
            return r.text
    finally:
        await backend.close()


def test_kv_transfer_time_per_request(pair: EnginePair) -> None:
    text = run(_serve_and_scrape(pair, None, ["Hello there, how are you?"]), 120)
    samples = _samples(str(text))
    assert samples["tandem:request_kv_transfer_time_seconds_count"] == 1
    assert samples["tandem:request_kv_transfer_time_seconds_sum"] > 0
    assert samples["tandem:request_kv_transfer_time_seconds_sum"] < 60
    # no vision service: no vision cache metrics, not zeros
    assert not any(name.startswith("tandem:vision_cache") for name in samples)


def test_vision_cache_counted_in_metrics(pair: EnginePair, vision: Service) -> None:
    image = [
        {"type": "image_url", "image_url": {"url": _image_url((12, 200, 77))}},
        {"type": "text", "text": "What is in the picture?"},
    ]
    text = run(_serve_and_scrape(pair, vision.target, [image, image]), 180)
    samples = _samples(str(text))
    assert samples["tandem:vision_cache_hits_total"] >= 1
    assert samples["tandem:vision_cache_misses_total"] >= 1
    assert samples["tandem:vision_cache_evictions_total"] == 0
    assert samples["tandem:vision_cache_bytes"] > 0
    # the service's own Stats agree that the second request was a hit
    with grpc.insecure_channel(vision.target) as ch:
        stats = vision_pb2_grpc.VisionEncoderStub(ch).Stats(
            vision_pb2.VisionStatsRequest(), timeout=5
        )
    assert stats.num_cache_hits >= 1 and stats.num_cache_entries >= 1
