"""VisionEncoder over real gRPC: the tiny model's vision tower behind a real server on
127.0.0.1, preprocessing in a real (spawned) worker process."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.models import load_model
from engine.tiny import ensure_tiny_model
from tandem.v1 import common_pb2, vision_pb2
from tests.vision_svc.service_helpers import (
    TIMEOUT_S,
    ServerThread,
    encode,
    image_item,
    make_video,
    noise_png,
    running,
    video_item,
)
from vision_svc.encoder import tensor_from_bytes
from vision_svc.processing import MediaConfig, MediaProcessor
from vision_svc.server import SERVICE_NAME, VisionServiceConfig, create_encoder

MM_KWARGS = {
    "video_min_frames": 2,
    "video_max_frames": 4,
    "video_min_pixels": 28 * 28,
    "video_max_pixels": 28 * 28 * 4,
}


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[ServerThread, grpc.Channel]]:
    config = VisionServiceConfig(
        device="cpu", dtype="float32", mm_processor_kwargs=MM_KWARGS, num_workers=1
    )
    with running(create_encoder(config)) as (server, channel):
        yield server, channel


@pytest.fixture(scope="module")
def full_model() -> torch.nn.Module:
    model, _ = load_model(ensure_tiny_model(), torch.float32, "cpu")
    return model


def embeddings(item: vision_pb2.EncodedMedia) -> torch.Tensor:
    t = item.embeddings
    return tensor_from_bytes(t.data, t.dtype, tuple(t.shape))


def test_image_equals_full_model(service, full_model) -> None:
    _, channel = service
    data = noise_png(150, 110, seed=1)
    [item] = encode(channel, image_item(data)).items

    processed = MediaProcessor(MediaConfig.from_mm_processor_kwargs(MM_KWARGS)).process_image(data)
    with torch.inference_mode():
        want = full_model.encode_media(
            torch.from_numpy(processed.pixel_values), [processed.grid_thw]
        )
    assert item.kind == common_pb2.MEDIA_KIND_IMAGE
    assert tuple(item.grid_thw) == processed.grid_thw
    assert item.num_tokens == processed.num_tokens == want.shape[0]
    assert item.content_hash == processed.content_hash
    assert item.embeddings.dtype == "float32" and list(item.embeddings.shape) == [
        item.num_tokens,
        64,
    ]
    assert torch.equal(embeddings(item), want)  # exact in fp32
    assert not item.cache_hit and list(item.frame_timestamps) == []


def test_same_image_twice_hits_the_cache(service) -> None:
    server, channel = service
    data = noise_png(90, 90, seed=2)
    calls = server.encoder.num_forward_calls
    hits = server.encoder.cache.stats().num_hits
    first = encode(channel, image_item(data)).items[0]
    assert server.encoder.num_forward_calls == calls + 1
    second = encode(channel, image_item(data)).items[0]
    assert server.encoder.num_forward_calls == calls + 1  # the tower did not run
    assert not first.cache_hit and second.cache_hit
    assert second.content_hash == first.content_hash
    assert second.embeddings.data == first.embeddings.data
    assert server.encoder.cache.stats().num_hits == hits + 1


def test_warm_up_without_embeddings(service) -> None:
    _, channel = service
    data = noise_png(60, 80, seed=3)
    [warm] = encode(channel, image_item(data), embeddings=False).items
    assert not warm.HasField("embeddings") and warm.num_tokens > 0
    [hot] = encode(channel, image_item(data)).items
    assert hot.cache_hit and list(hot.embeddings.shape) == [warm.num_tokens, 64]


def test_several_items_answer_in_order(service) -> None:
    _, channel = service
    sizes = [(56, 56), (112, 84), (84, 140)]
    items = [image_item(noise_png(w, h, seed=10 + i)) for i, (w, h) in enumerate(sizes)]
    out = encode(channel, *items).items
    assert [tuple(i.grid_thw) for i in out] == [(1, 4, 4), (1, 6, 8), (1, 10, 6)]


def test_corrupt_image_is_invalid_argument(service) -> None:
    _, channel = service
    with pytest.raises(grpc.RpcError) as err:
        encode(channel, image_item(b"\x89PNG\r\n\x1a\n" + b"\0" * 64))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image" in err.value.details() and "Traceback" not in err.value.details()


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (vision_pb2.MediaData(data=b"abc"), "kind must be IMAGE or VIDEO"),
        (video_item(b"abc", "{not json"), "overrides_json is not JSON"),
        (video_item(b"abc", "[1]"), "must be a JSON object"),
        (video_item(b"abc", json.dumps({"max_frames": "3"})), "max_frames must be int"),
        (vision_pb2.MediaData(kind=common_pb2.MEDIA_KIND_IMAGE), "empty"),
    ],
)
def test_bad_requests_are_invalid_argument(service, item, reason) -> None:
    _, channel = service
    with pytest.raises(grpc.RpcError) as err:
        encode(channel, item)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in err.value.details()


def test_video_frames_follow_video_max_frames(service) -> None:
    _, channel = service
    clip = make_video(40, 10)  # 4 s: fps 2 gives 8 frames, clamped to video_max_frames=4
    [item] = encode(channel, video_item(clip)).items
    t, h, w = item.grid_thw
    assert item.kind == common_pb2.MEDIA_KIND_VIDEO and t == 4
    assert list(item.frame_timestamps) == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert item.num_tokens == t * h * w // 8
    assert list(item.embeddings.shape) == [item.num_tokens, 64]

    [fewer] = encode(channel, video_item(clip, json.dumps({"max_frames": 2}))).items
    assert fewer.grid_thw[0] == 2 and len(fewer.frame_timestamps) == 2
    assert fewer.content_hash != item.content_hash and not fewer.cache_hit


def test_health_serving(service) -> None:
    _, channel = service
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_vision_encoder(service) -> None:
    _, channel = service
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    [reply] = list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT_S))
    names = {s.name for s in reply.list_services_response.service}
    assert {"tandem.v1.VisionEncoder", "grpc.health.v1.Health"} <= names


def test_identical_items_in_flight_share_one_forward(service) -> None:
    server, channel = service
    data = noise_png(70, 70, seed=4)
    calls = server.encoder.num_forward_calls
    a, b = encode(channel, image_item(data), image_item(data)).items
    assert server.encoder.num_forward_calls == calls + 1
    assert sorted([a.cache_hit, b.cache_hit]) == [False, True]
    assert a.embeddings.data == b.embeddings.data
