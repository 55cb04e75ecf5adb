"""`GrpcBackend`: the gateway's `Backend` over the disaggregated services.

One request: open `Decode.Generate` (decode reserves KV blocks and answers `Reserved`, or
RESOURCE_EXHAUSTED at once) → `Prefill.Prefill` with that reservation (prefill computes
the prompt, streams the KV to decode, hands over the first token) → relay decode's
deltas. Closing the stream cancels both calls, which frees the request on both sides; a
failed prefill cancels the decode stream; a dead decode surfaces as UNAVAILABLE within
the channel's keepalive.

Several prefill and decode instances: each request goes to the least loaded instance of
each role (`_Pool`: fewest active requests by the last `Stats` snapshot or this backend's
own calls in flight, whichever is more; ties in round-robin order). A decode that answers
RESOURCE_EXHAUSTED (full) or UNAVAILABLE before reserving anything is skipped for the next
one; when every decode refused, the request fails with `OverloadedError` (503 +
Retry-After at the gateway). `refresh_stats` polls every instance (`tandem serve` calls it
every 2 s) for the load and for `stats()`, and the vision service (if any) for its
embedding cache counters. Decode's first delta carries the request's KV transfer time
(`RequestTimings.kv_transfer_s`).

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
    RequestTimings,
    VisionCacheStats,
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
    prefill: tuple[str, ...]
    """host:port of each Prefill service instance."""
    decode: tuple[str, ...]
    """host:port of each Decode service instance."""
    vision: str | None = None
    """host:port of a VisionEncoder; None = preprocess here, prefill encodes."""
    model_name: str = "tiny-ernie-vl"
    max_model_len: int = 4096
    transfer_timeout_s: float = 30.0
    prefill_timeout_s: float = 120.0
    mm_processor_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for role in ("prefill", "decode"):
            targets = getattr(self, role)
            if not isinstance(targets, tuple) or not targets:
                raise ValueError(f"{role}: a non-empty tuple of host:port, got {targets!r}")


@dataclass
class _Instance:
    """One engine service instance as this backend sees it."""

    target: str
    channel: grpc.aio.Channel
    stub: Any
    num_in_flight: int = 0
    """This backend's calls open on it now."""
    last_stats: engine_pb2.EngineStats | None = None
    """Its last `Stats` answer; None before the first or when the last one failed."""
    reachable: bool = True

    @property
    def load(self) -> int:
        reported = self.last_stats.num_requests if self.last_stats is not None else 0
        return max(reported, self.num_in_flight)

    async def refresh(self) -> None:
        try:
            self.last_stats = await self.stub.Stats(engine_pb2.StatsRequest(), timeout=2.0)
            self.reachable = True
        except grpc.aio.AioRpcError:
            self.last_stats, self.reachable = None, False


class _Pool:
    """The instances of one role, ranked for each request: reachable ones first, then by
    `load`; a stable sort over a rotating start breaks ties round-robin."""

    def __init__(self, targets: tuple[str, ...], stub_cls: Any) -> None:
        self.instances = []
        for target in targets:
            channel = grpc.aio.insecure_channel(target, _CHANNEL_OPTIONS)
            self.instances.append(_Instance(target, channel, stub_cls(channel)))
        self._turn = 0

    def ranked(self) -> list[_Instance]:
        n = len(self.instances)
        start, self._turn = self._turn, (self._turn + 1) % n
        rotated = [self.instances[(start + i) % n] for i in range(n)]
        return sorted(rotated, key=lambda inst: (not inst.reachable, inst.load))

    async def close(self) -> None:
        for inst in self.instances:
            await inst.channel.close()


class GrpcBackend:
    def __init__(self, config: GrpcBackendConfig, media_tokens: MediaTokens) -> None:
        self.config = config
        self.model_name = config.model_name
        self.max_model_len = config.max_model_len
        self._media_tokens = media_tokens
        self._prefills = _Pool(config.prefill, engine_pb2_grpc.PrefillStub)
        self._decodes = _Pool(config.decode, engine_pb2_grpc.DecodeStub)
        self._vision_channel: grpc.aio.Channel | None = None
        self._vision: Any = None
        self._processor: Any = None
        self._stats = BackendStats(engines=())

    async def close(self) -> None:
        await self._prefills.close()
        await self._decodes.close()
        if self._vision_channel is not None:
            await self._vision_channel.close()

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
        from tandem.v1 import vision_pb2

        data = vision_pb2.MediaData(
            kind=pb.KIND_IDS[item.kind],
            data=item.data,
            overrides_json=json.dumps(dict(item.overrides)) if item.overrides else "",
        )
        request = vision_pb2.EncodeRequest(items=[data], return_embeddings=True)
        try:
            reply = await self._vision_stub().Encode(request, timeout=self.config.prefill_timeout_s)
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
        decode, call, reserved = await self._reserve(req, prompt)
        decode.num_in_flight += 1
        prefill: asyncio.Task[engine_pb2.PrefillResponse] | None = None
        finished = False
        try:
            prefill = asyncio.create_task(self._prefill(req, prompt, reserved))
            async for delta in self._deltas(call, prefill):
                finished = delta.finished
                yield delta
                if finished:
                    return
        finally:
            decode.num_in_flight -= 1
            call.cancel()  # a no-op once finished; frees the request on decode otherwise
            # Decode may finish before prefill's answer arrives: let that one complete.
            if prefill is not None and not prefill.done() and not finished:
                prefill.cancel()
            if prefill is not None:
                prefill.add_done_callback(_consume)

    async def _reserve(
        self, req: GenerateRequest, prompt: engine_pb2.EnginePrompt
    ) -> tuple[_Instance, Any, engine_pb2.Reservation]:
        """Open `Decode.Generate` on the least loaded decode that has room for `req`."""
        request = engine_pb2.DecodeRequest(
            request_id=req.request_id,
            prompt=prompt,
            transfer_timeout_s=self.config.transfer_timeout_s,
        )
        refusals: list[grpc.aio.AioRpcError] = []
        for decode in self._decodes.ranked():
            call = decode.stub.Generate(request)
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _TRY_NEXT_DECODE:
                    raise _gateway_error(exc, "decode") from exc
                refusals.append(exc)
                continue
            except BaseException:  # cancelled while waiting: drop the reservation
                call.cancel()
                raise
            if first is grpc.aio.EOF or first.WhichOneof("event") != "reserved":
                call.cancel()
                raise BackendUnavailableError("decode answered without a reservation")
            return decode, call, first.reserved
        why = "; ".join(f"{e.code().name}: {e.details()}" for e in refusals)
        n = len(refusals)
        if any(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refusals):
            raise OverloadedError(f"every decode instance ({n}) is at capacity ({why})")
        raise BackendUnavailableError(f"no decode instance ({n}) is reachable ({why})")

    async def _prefill(
        self, req: GenerateRequest, prompt: engine_pb2.EnginePrompt, r: engine_pb2.Reservation
    ) -> engine_pb2.PrefillResponse:
        embeddings = [m.payload for m in req.media if m.payload is not None]
        request = engine_pb2.PrefillRequest(
            request_id=req.request_id, prompt=prompt, embeddings=embeddings, reservation=r
        )
        prefill = self._prefills.ranked()[0]
        prefill.num_in_flight += 1
        try:
            return await prefill.stub.Prefill(request, timeout=self.config.prefill_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _gateway_error(exc, "prefill") from exc
        finally:
            prefill.num_in_flight -= 1

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
            yield _delta(msg)

    async def check_health(self) -> bool:
        """True while every service (vision if configured, each prefill and decode
        instance) answers its gRPC health check SERVING."""
        channels = [inst.channel for inst in (*self._prefills.instances, *self._decodes.instances)]
        if self.config.vision is not None:
            channels.append(self._vision_channel_open())
        return all(await asyncio.gather(*(_serving(ch) for ch in channels)))

    async def engine_stats(self) -> dict[str, list[engine_pb2.EngineStats | None]]:
        """Every instance's `Stats` snapshot by role (None: it did not answer)."""
        await self.refresh_stats()
        return {
            "prefill": [inst.last_stats for inst in self._prefills.instances],
            "decode": [inst.last_stats for inst in self._decodes.instances],
        }

    async def refresh_stats(self) -> None:
        """Poll every instance's `Stats` (the load for routing) and cache a `BackendStats`
        for `stats()` (call periodically)."""
        instances = [*self._prefills.instances, *self._decodes.instances]
        _, vision = await asyncio.gather(
            asyncio.gather(*(inst.refresh() for inst in instances)), self._vision_stats()
        )
        self._stats = _backend_stats(self._prefills, self._decodes, vision)

    async def _vision_stats(self) -> VisionCacheStats | None:
        """The vision service's cache counters; None without one or when it did not answer."""
        if self.config.vision is None:
            return None
        from tandem.v1 import vision_pb2

        try:
            s = await self._vision_stub().Stats(vision_pb2.VisionStatsRequest(), timeout=2.0)
        except grpc.aio.AioRpcError:
            return None
        return VisionCacheStats(
            num_hits=s.num_cache_hits,
            num_misses=s.num_cache_misses,
            num_evictions=s.num_cache_evictions,
            num_bytes=s.num_cache_bytes,
        )

    def stats(self) -> BackendStats:
        return self._stats

    def _vision_stub(self) -> Any:
        if self._vision is None:
            from tandem.v1 import vision_pb2_grpc

            self._vision = vision_pb2_grpc.VisionEncoderStub(self._vision_channel_open())
        return self._vision

    def _vision_channel_open(self) -> grpc.aio.Channel:
        if self._vision_channel is None:
            target = self.config.vision or ""
            self._vision_channel = grpc.aio.insecure_channel(target, _CHANNEL_OPTIONS)
        return self._vision_channel


_TRY_NEXT_DECODE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


async def _serving(channel: grpc.aio.Channel) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2.0
        )
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _backend_stats(
    prefills: _Pool, decodes: _Pool, vision: VisionCacheStats | None = None
) -> BackendStats:
    """Per role, the sum over the instances that answered; a role none answered for is
    left out (nothing measured). Transfer failures are decode's count: every transfer ends
    at a decode reservation, and a prefill that cannot send shows there as a timeout."""
    engines = []
    for role, pool in (("prefill", prefills), ("decode", decodes)):
        got = [inst.last_stats for inst in pool.instances if inst.last_stats is not None]
        if not got:
            continue
        engines.append(
            EngineStats(
                role=role,  # type: ignore[arg-type]
                num_requests_running=sum(s.num_requests_running for s in got),
                num_requests_waiting=sum(s.num_requests_waiting for s in got),
                num_kv_blocks_used=sum(s.num_used_blocks for s in got),
                num_kv_blocks_total=sum(s.num_used_blocks + s.num_free_blocks for s in got),
                num_prefix_cache_queries=sum(s.num_prefix_cache_queries for s in got),
                num_prefix_cache_hits=sum(s.num_prefix_cache_hits for s in got),
            )
        )
    answered = [inst.last_stats for inst in decodes.instances if inst.last_stats is not None]
    failures = sum(s.num_transfer_failures for s in answered) if answered else None
    return BackendStats(engines=tuple(engines), num_kv_transfer_failures=failures, vision=vision)


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


def _delta(msg: engine_pb2.DecodeResponse) -> GenerateDelta:
    d = msg.delta
    finish = pb.FINISH_NAMES.get(d.finish_reason)
    timings = (
        RequestTimings(kv_transfer_s=msg.timings.kv_transfer_s) if msg.HasField("timings") else None
    )
    return GenerateDelta(
        token_ids=list(d.token_ids),
        logprobs=pb.logprobs_from_pb(d.logprobs),
        finished=finish is not None,
        finish_reason=finish,
        num_prompt_tokens=d.usage.prompt_tokens,
        num_cached_tokens=d.usage.cached_tokens,
        num_output_tokens=d.usage.completion_tokens,
        timings=timings,
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
