"""`GrpcBackend`: the gateway's `Backend` over the disaggregated services.

One request: open `Decode.Generate` (decode reserves KV blocks and answers `Reserved`, or
RESOURCE_EXHAUSTED at once) → `Prefill.Prefill` with that reservation (prefill computes
the prompt, streams the KV to decode, hands over the first token) → relay decode's
deltas. Closing the stream cancels both calls, which frees the request on both sides; a
failed prefill cancels the decode stream; a dead decode surfaces as UNAVAILABLE within
the channel's keepalive.

Media: with a vision endpoint, `VisionEncoder.Encode` returns embeddings (the payload
shipped to prefill); without one, media are preprocessed here (torch-free) and prefill
runs the vision tower on the pixels. Torch-free: it runs inside the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import asdict, dataclass
from typing import Any

import grpc

from chat.multimodal import MediaTokens
from gateway.backend import (
    BackendStats,
    EncodedMedia,
    EngineStats,
    GenerateDelta,
    GenerateRequest,
    MediaItem,
)
from gateway.errors import (
    BackendUnavailableError,
    InvalidRequestError,
    OverloadedError,
    UpstreamTimeoutError,
)
from tandem import pb
from tandem.v1 import common_pb2, engine_pb2, engine_pb2_grpc

log = logging.getLogger("tandem.grpc_backend")

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True)
class GrpcBackendConfig:
    prefill: str
    """host:port of a Prefill service."""
    decode: str
    """host:port of a Decode service."""
    vision: str | None = None
    """host:port of a VisionEncoder; None = preprocess here, prefill encodes."""
    model_name: str = "tiny-ernie-vl"
    max_model_len: int = 4096
    transfer_timeout_s: float = 30.0
    prefill_timeout_s: float = 120.0
    mm_processor_kwargs: dict[str, Any] | None = None


class GrpcBackend:
    def __init__(self, config: GrpcBackendConfig, media_tokens: MediaTokens) -> None:
        self.config = config
        self.model_name = config.model_name
        self.max_model_len = config.max_model_len
        self._media_tokens = media_tokens
        self._prefill_channel = grpc.aio.insecure_channel(config.prefill, _CHANNEL_OPTIONS)
        self._decode_channel = grpc.aio.insecure_channel(config.decode, _CHANNEL_OPTIONS)
        self.prefill = engine_pb2_grpc.PrefillStub(self._prefill_channel)
        self.decode = engine_pb2_grpc.DecodeStub(self._decode_channel)
        self._vision: Any = None
        self._processor: Any = None
        self._stats = BackendStats(engines=())

    async def close(self) -> None:
        await self._prefill_channel.close()
        await self._decode_channel.close()

    # -- media ----------------------------------------------------------------------------

    async def encode_media(self, item: MediaItem) -> EncodedMedia:
        if self.config.vision is not None:
            return await self._encode_remote(item)
        return await self._encode_local(item)

    async def _encode_local(self, item: MediaItem) -> EncodedMedia:
        from vision_svc.processing import MediaConfig, MediaError, MediaProcessor

        if self._processor is None:
            config = MediaConfig.from_mm_processor_kwargs(self.config.mm_processor_kwargs)
            self._processor = MediaProcessor(config)
        try:
            done = await asyncio.to_thread(
                self._processor.process, item.kind, item.data, dict(item.overrides) or None
            )
        except MediaError as exc:
            raise InvalidRequestError(f"cannot use this {item.kind}: {exc}") from exc
        payload = engine_pb2.MediaEmbedding(
            content_hash=done.content_hash, pixel_values=pb.numpy_to_tensor(done.pixel_values)
        )
        return EncodedMedia(done.kind, done.grid_thw, done.num_tokens, done.content_hash, payload)

    async def _encode_remote(self, item: MediaItem) -> EncodedMedia:
        from tandem.v1 import vision_pb2, vision_pb2_grpc

        if self._vision is None:
            channel = grpc.aio.insecure_channel(self.config.vision or "", _CHANNEL_OPTIONS)
            self._vision = vision_pb2_grpc.VisionEncoderStub(channel)
        data = vision_pb2.MediaData(
            kind=pb.KIND_IDS[item.kind],
            data=item.data,
            overrides_json=json.dumps(dict(item.overrides)) if item.overrides else "",
        )
        request = vision_pb2.EncodeRequest(items=[data], return_embeddings=True)
        try:
            reply = await self._vision.Encode(request, timeout=self.config.prefill_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _gateway_error(exc, "vision") from exc
        got = reply.items[0]
        payload = engine_pb2.MediaEmbedding(
            content_hash=got.content_hash, embeddings=got.embeddings
        )
        grid = (got.grid_thw[0], got.grid_thw[1], got.grid_thw[2])
        return EncodedMedia(item.kind, grid, got.num_tokens, got.content_hash, payload)

    # -- generation -----------------------------------------------------------------------

    def _prompt(self, req: GenerateRequest) -> engine_pb2.EnginePrompt:
        spans, cursor = [], 0
        ids = req.prompt_token_ids
        for m in req.media:
            placeholder = (
                self._media_tokens.image_token_id
                if m.kind == "image"
                else self._media_tokens.video_token_id
            )
            offset = _find_run(ids, placeholder, cursor)
            spans.append(
                common_pb2.MediaSpan(
                    kind=pb.KIND_IDS[m.kind],
                    offset=offset,
                    length=m.num_tokens,
                    grid_thw=list(m.grid),
                    content_hash=m.content_hash,
                )
            )
            cursor = offset + m.num_tokens
        sampling = asdict(req.sampling)
        return engine_pb2.EnginePrompt(
            token_ids=ids, media=spans, sampling=pb.sampling_to_pb(sampling)
        )

    async def generate(self, req: GenerateRequest) -> AsyncGenerator[GenerateDelta, None]:
        prompt = self._prompt(req)
        call = self.decode.Generate(
            engine_pb2.DecodeRequest(
                request_id=req.request_id,
                prompt=prompt,
                transfer_timeout_s=self.config.transfer_timeout_s,
            )
        )
        prefill: asyncio.Task[engine_pb2.PrefillResponse] | None = None
        finished = False
        try:
            first = await _next(call, "decode")
            if first is None or first.WhichOneof("event") != "reserved":
                raise BackendUnavailableError("decode answered without a reservation")
            prefill = asyncio.create_task(self._prefill(req, prompt, first.reserved))
            async for delta in self._deltas(call, prefill):
                finished = delta.finished
                yield delta
                if finished:
                    return
        finally:
            call.cancel()  # a no-op once finished; frees the request on decode otherwise
            # Decode may finish before prefill's answer arrives: let that one complete.
            if prefill is not None and not prefill.done() and not finished:
                prefill.cancel()
            if prefill is not None:
                prefill.add_done_callback(_consume)

    async def _prefill(
        self, req: GenerateRequest, prompt: engine_pb2.EnginePrompt, r: engine_pb2.Reservation
    ) -> engine_pb2.PrefillResponse:
        embeddings = [m.payload for m in req.media if m.payload is not None]
        request = engine_pb2.PrefillRequest(
            request_id=req.request_id, prompt=prompt, embeddings=embeddings, reservation=r
        )
        try:
            return await self.prefill.Prefill(request, timeout=self.config.prefill_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _gateway_error(exc, "prefill") from exc

    async def _deltas(
        self, call: Any, prefill: asyncio.Task[engine_pb2.PrefillResponse]
    ) -> AsyncGenerator[GenerateDelta, None]:
        """Decode's deltas; a failed prefill ends the stream with its error."""
        while True:
            nxt = asyncio.ensure_future(_next(call, "decode"))
            try:
                waiting = {nxt} if prefill.done() else {nxt, prefill}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if prefill in done and nxt not in done and not prefill.cancelled():
                    error = prefill.exception()
                    if error is not None:
                        raise error
                msg = await nxt
            finally:
                if not nxt.done():
                    nxt.cancel()
                nxt.add_done_callback(_consume)
            if msg is None:
                raise BackendUnavailableError("decode ended the stream before finishing")
            yield _delta(msg.delta)

    async def check_health(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            for channel in (self._prefill_channel, self._decode_channel):
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2.0
                )
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    return False
        except grpc.aio.AioRpcError:
            return False
        return True

    async def engine_stats(self) -> dict[str, engine_pb2.EngineStats]:
        """Both engines' snapshots (admin RPC `Stats`)."""
        request = engine_pb2.StatsRequest()
        return {
            "prefill": await self.prefill.Stats(request, timeout=5.0),
            "decode": await self.decode.Stats(request, timeout=5.0),
        }

    async def refresh_stats(self) -> None:
        """Cache a `BackendStats` for `stats()` (call periodically)."""
        try:
            got = await self.engine_stats()
        except grpc.aio.AioRpcError:
            return
        engines = tuple(
            EngineStats(
                role=role,  # type: ignore[arg-type]
                num_requests_running=s.num_requests,
                num_requests_waiting=0,
                num_kv_blocks_used=s.num_used_blocks,
                num_kv_blocks_total=s.num_used_blocks + s.num_free_blocks,
                num_prefix_cache_queries=0,
                num_prefix_cache_hits=0,
            )
            for role, s in got.items()
        )
        failures = sum(s.num_transfer_failures for s in got.values())
        self._stats = BackendStats(engines=engines, num_kv_transfer_failures=failures)

    def stats(self) -> BackendStats:
        return self._stats


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve a background task's outcome so asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()


def _find_run(ids: list[int], token_id: int, start: int) -> int:
    for i in range(start, len(ids)):
        if ids[i] == token_id:
            return i
    raise InvalidRequestError("a media item has no placeholder in the prompt")


async def _next(call: Any, who: str) -> engine_pb2.DecodeResponse | None:
    try:
        msg = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise _gateway_error(exc, who) from exc
    return None if msg is grpc.aio.EOF else msg


def _delta(d: common_pb2.Delta) -> GenerateDelta:
    finish = pb.FINISH_NAMES.get(d.finish_reason)
    return GenerateDelta(
        token_ids=list(d.token_ids),
        logprobs=pb.logprobs_from_pb(d.logprobs),
        finished=finish is not None,
        finish_reason=finish,
        num_prompt_tokens=d.usage.prompt_tokens,
        num_cached_tokens=d.usage.cached_tokens,
        num_output_tokens=d.usage.completion_tokens,
    )


def _gateway_error(exc: grpc.aio.AioRpcError, who: str) -> Exception:
    """gRPC status of an engine service → the gateway's error (HTTP status from its table)."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OverloadedError(f"{who} is at capacity: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return UpstreamTimeoutError(f"{who} timed out: {details}")
    return BackendUnavailableError(f"{who} failed ({code.name}): {details}")
