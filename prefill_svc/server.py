"""gRPC `tandem.v1.Prefill`: the prefill engine role behind a thin servicer.

pb → domain (`PrefillRole.add` on the engine thread) → wait for the role's answer →
pb. Cancelling the RPC (the caller gave up, or its deadline passed) aborts the request
here and tells decode through the KV transport. Errors are raised as domain exceptions;
`tandem.services.ErrorInterceptor` turns them into status codes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
import torch

from engine.kv_transfer.base import KVReservation
from engine.kv_transfer.zmq_transport import ZmqTransport
from engine.llm_engine import EngineArgs, LLMEngine, RequestError
from engine.multimodal import MediaInput
from engine.roles.loop import EngineLoop, Sink
from engine.roles.prefill import PrefillResult, PrefillRole
from engine.sampling_params import SamplingParams
from tandem import pb
from tandem.services import ServiceProcess
from tandem.v1 import engine_pb2, engine_pb2_grpc

log = logging.getLogger("tandem.prefill_svc")

DEFAULT_TIMEOUT_S = 120.0  # when the caller set no deadline


class PrefillServicer(engine_pb2_grpc.PrefillServicer):
    def __init__(self, loop: EngineLoop, role: PrefillRole) -> None:
        self.loop = loop
        self.role = role

    async def Prefill(
        self, request: engine_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.PrefillResponse:
        rid = request.request_id
        prompt = request.prompt
        params = SamplingParams(n=1, **pb.sampling_from_pb(prompt.sampling))
        media = _media_inputs(request)
        reservation = _reservation(request.reservation)
        remaining = context.time_remaining()
        timeout_s = DEFAULT_TIMEOUT_S if remaining is None else max(0.1, remaining)
        sink = Sink(asyncio.get_running_loop())
        ids = list(prompt.token_ids)
        salt = prompt.cache_salt or None
        added = False
        try:
            await self.loop.call(
                lambda: self.role.add(rid, ids, params, media, salt, reservation, sink, timeout_s)
            )
            added = True
            result: PrefillResult = await sink.get(timeout_s + 1.0)
        except BaseException as exc:
            if added or isinstance(exc, asyncio.CancelledError):  # no await: may be a cancel
                self.loop.submit(lambda: self.role.abort(rid))
            raise
        logprobs = pb.logprobs_to_pb(result.logprobs)
        return engine_pb2.PrefillResponse(
            first_token_id=result.first_token_id,
            num_cached_tokens=result.num_cached_tokens,
            first_logprobs=logprobs[0] if logprobs else None,
            kv_bytes_sent=result.kv_bytes_sent,
        )

    async def Stats(
        self, request: engine_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.EngineStats:
        return engine_pb2.EngineStats(**await self.loop.call(self.role.stats))


def _reservation(r: engine_pb2.Reservation) -> KVReservation:
    if not r.kv_endpoint or not r.transfer_token:
        raise RequestError("the request carries no reservation (open Decode.Generate first)")
    return KVReservation(
        endpoint=r.kv_endpoint,
        block_ids=tuple(r.block_ids),
        num_cached_blocks=r.num_cached_blocks,
        token=bytes(r.transfer_token),
        block_size=r.block_size,
    )


def _media_inputs(request: engine_pb2.PrefillRequest) -> list[MediaInput]:
    """One input per media span; embeddings (vision_svc) or pixels (encode here)."""
    by_hash = {e.content_hash: e for e in request.embeddings}
    out = []
    for span in request.prompt.media:
        item = by_hash.get(span.content_hash)
        if item is None:
            raise RequestError(f"no embeddings or pixels for media {span.content_hash!r}")
        has_embeds = item.HasField("embeddings") and item.embeddings.shape
        pixels = pb.tensor_to_torch(item.pixel_values) if item.HasField("pixel_values") else None
        embeds = pb.tensor_to_torch(item.embeddings) if has_embeds else None
        if embeds is None and pixels is None:
            raise RequestError(f"media {span.content_hash!r} has neither embeddings nor pixels")
        out.append(
            MediaInput(
                kind=pb.KINDS.get(span.kind, "image"),
                pixel_values=pixels if pixels is not None else torch.empty(0),
                grid=(span.grid_thw[0], span.grid_thw[1], span.grid_thw[2]),
                content_hash=span.content_hash,
                embeds=embeds,
            )
        )
    return out


@dataclass(frozen=True)
class PrefillServiceConfig:
    engine: EngineArgs
    address: str = "127.0.0.1:50061"
    grace_s: float = 10.0


def serve(config: PrefillServiceConfig) -> int:
    """Load the model, serve until SIGTERM; non-zero exit when the engine died."""
    engine = LLMEngine(config.engine)
    sender = ZmqTransport().sender(engine.runner.kv_caches)
    role = PrefillRole(engine, sender)
    loop = EngineLoop(role, name="tandem-prefill")
    loop.start()

    def add(server: grpc.aio.Server) -> None:
        engine_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(loop, role), server)

    async def main() -> int:
        process = ServiceProcess.create(add, ["tandem.v1.Prefill"], config.address)

        async def on_stop() -> None:
            await asyncio.to_thread(loop.stop)
            sender.close()

        return await process.serve_until_stopped(
            lambda: loop.is_alive, grace_s=config.grace_s, on_stop=on_stop
        )

    try:
        return asyncio.run(main())
    finally:
        engine.shutdown()  # tensor-parallel workers, if any
