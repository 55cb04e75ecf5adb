"""`VisionEncoderService`: the thin gRPC adapter, `EncodeRequest` ↔ `MediaEncoder`, and
`Stats` ↔ its embedding cache's `stats()`.

No logic lives here: protobuf in, domain objects to the encoder, protobuf out. Errors
propagate to `ErrorInterceptor`, which owns the status codes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc

from tandem.v1 import common_pb2, vision_pb2, vision_pb2_grpc
from vision_svc.encoder import EncodeResult, MediaEncoder, MediaRequest
from vision_svc.processing import InvalidMediaOptionsError

KIND_NAMES = {common_pb2.MEDIA_KIND_IMAGE: "image", common_pb2.MEDIA_KIND_VIDEO: "video"}
KIND_PB = {name: kind for kind, name in KIND_NAMES.items()}


def media_request(item: vision_pb2.MediaData, index: int) -> MediaRequest:
    """pb → domain; a bad kind or overrides JSON is a `MediaError` naming the item."""
    kind = KIND_NAMES.get(item.kind)
    if kind is None:
        raise InvalidMediaOptionsError(f"item {index}: kind must be IMAGE or VIDEO")
    return MediaRequest(kind, item.data, _overrides(item.overrides_json, index))


def _overrides(text: str, index: int) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidMediaOptionsError(f"item {index}: overrides_json is not JSON: {e}") from e
    if not isinstance(value, dict):
        raise InvalidMediaOptionsError(f"item {index}: overrides_json must be a JSON object")
    return value


def encoded_media(result: EncodeResult, with_embeddings: bool) -> vision_pb2.EncodedMedia:
    """domain → pb."""
    media = result.media
    out = vision_pb2.EncodedMedia(
        kind=KIND_PB[media.kind],
        grid_thw=list(media.grid_thw),
        num_tokens=media.num_tokens,
        content_hash=result.content_hash,
        frame_timestamps=list(media.frame_timestamps),
        cache_hit=result.cache_hit,
    )
    if with_embeddings:
        out.embeddings.CopyFrom(
            common_pb2.Tensor(dtype=media.dtype, shape=list(media.shape), data=media.embeddings)
        )
    return out


class VisionEncoderService(vision_pb2_grpc.VisionEncoderServicer):
    """`tandem.v1.VisionEncoder`: items are encoded concurrently, answered in order."""

    def __init__(self, encoder: MediaEncoder) -> None:
        self.encoder = encoder

    async def Encode(
        self, request: vision_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.EncodeResponse:
        items = [media_request(item, i) for i, item in enumerate(request.items)]
        results = await asyncio.gather(*(self.encoder.encode(item) for item in items))
        return vision_pb2.EncodeResponse(
            items=[encoded_media(r, request.return_embeddings) for r in results]
        )

    async def Stats(
        self, request: vision_pb2.VisionStatsRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.VisionStats:
        s = self.encoder.cache.stats()
        return vision_pb2.VisionStats(
            num_cache_hits=s.num_hits,
            num_cache_misses=s.num_misses,
            num_cache_evictions=s.num_evictions,
            num_cache_entries=s.num_entries,
            num_cache_bytes=s.num_bytes,
            cache_capacity_bytes=s.capacity_bytes,
        )
