"""gRPC `tandem.v1.Decode`: the decode engine role behind a thin servicer.

`Generate` reserves KV blocks on the engine thread and answers `Reserved` at once (or
RESOURCE_EXHAUSTED), then turns each engine output into a `Delta`: token ids plus text
(`chat.text_stream.TextStream`: incremental detokenizer, stop strings, ernie-45-vl
reasoning split) and cumulative usage; the first delta also carries `DecodeTimings` (the
KV transfer's duration). A stop string ends the request here; cancelling
the stream (the caller went away) frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import grpc

from chat.reasoning import PARSER_NAMES, ReasoningStatus
from chat.text_stream import TextChunk, TextOptions, TextStream
from engine.kv_transfer.base import KVReservation
from engine.kv_transfer.zmq_transport import ZmqTransport
from engine.llm_engine import EngineArgs, LLMEngine, RequestError
from engine.request import RequestOutput
from engine.roles.decode import DecodeRole, MediaLayout
from engine.roles.loop import EngineLoop, Sink
from engine.sampling_params import SamplingParams
from tandem import pb
from tandem.services import ServiceProcess
from tandem.v1 import common_pb2, engine_pb2, engine_pb2_grpc

if TYPE_CHECKING:
    from chat.tokenizer import Tokenizer

log = logging.getLogger("tandem.decode_svc")

DEFAULT_TRANSFER_TIMEOUT_S = 60.0


class DecodeServicer(engine_pb2_grpc.DecodeServicer):
    def __init__(self, loop: EngineLoop, role: DecodeRole) -> None:
        self.loop = loop
        self.role = role
        engine = role.engine
        # A `dummy` engine without a tokenizer has TokenIdsOnly, which offers the methods
        # TextStream calls and decodes every token to empty text.
        self.tokenizer = cast("Tokenizer", engine.tokenizer)
        start, end = engine.think_start_id, engine.think_end_id
        self.think_ids = (-1 if start is None else start, -1 if end is None else end)

    async def Generate(
        self, request: engine_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.DecodeResponse]:
        rid = request.request_id
        prompt = request.prompt
        ids = list(prompt.token_ids)
        params = SamplingParams(n=1, **pb.sampling_from_pb(prompt.sampling))
        text = TextStream(self.tokenizer, self._text_options(request, params, ids))
        media = [
            MediaLayout(pb.KINDS.get(m.kind, "image"), _grid(m.grid_thw), m.content_hash)
            for m in prompt.media
        ]
        timeout_s = request.transfer_timeout_s or DEFAULT_TRANSFER_TIMEOUT_S
        salt = prompt.cache_salt or None
        sink = Sink(asyncio.get_running_loop())
        try:
            reservation = await self.loop.call(
                lambda: self.role.reserve(rid, ids, params, media, salt, sink, timeout_s)
            )
        except asyncio.CancelledError:  # the reserve may still run: free what it takes
            self.loop.submit(lambda: self.role.abort(rid))
            raise
        done = first = False
        try:
            yield engine_pb2.DecodeResponse(reserved=_reservation_pb(reservation))
            while not done:
                out: RequestOutput = await sink.get()
                timings = None
                if not first:
                    first = True
                    kv_transfer_s = self.role.pop_kv_transfer_s(rid)
                    if kv_transfer_s is not None:
                        timings = engine_pb2.DecodeTimings(kv_transfer_s=kv_transfer_s)
                chunk = text.feed(
                    out.new_token_ids, finished=out.finished, finish_reason=out.finish_reason
                )
                done = chunk.finish_reason is not None
                if done and not out.finished:  # a stop string ended it on the text side
                    self.loop.submit(lambda: self.role.stop(rid))
                yield engine_pb2.DecodeResponse(delta=_delta(out, chunk, text), timings=timings)
        finally:
            if not done:  # cancelled or failed: free it (no await, this may be a cancel)
                self.loop.submit(lambda: self.role.abort(rid))

    async def Stats(
        self, request: engine_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.EngineStats:
        return engine_pb2.EngineStats(**await self.loop.call(self.role.stats))

    def _text_options(
        self, request: engine_pb2.DecodeRequest, params: SamplingParams, ids: list[int]
    ) -> TextOptions:
        parser = request.reasoning_parser
        if parser and parser not in PARSER_NAMES:
            raise RequestError(f"unknown reasoning parser {parser!r}; known: {PARSER_NAMES}")
        status = ReasoningStatus.from_prompt_ids(ids, *self.think_ids) if parser else None
        return TextOptions(
            stop=tuple(params.stop),
            include_stop_str_in_output=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens,
            reasoning=status,
        )


def _grid(values: Sequence[int]) -> tuple[int, int, int]:
    if len(values) != 3:
        raise RequestError(f"a media grid is (t, h, w), got {list(values)}")
    return int(values[0]), int(values[1]), int(values[2])


def _reservation_pb(r: KVReservation) -> engine_pb2.Reservation:
    return engine_pb2.Reservation(
        kv_endpoint=r.endpoint,
        block_ids=list(r.block_ids),
        num_cached_blocks=r.num_cached_blocks,
        transfer_token=r.token,
        block_size=r.block_size,
    )


def _delta(out: RequestOutput, chunk: TextChunk, text: TextStream) -> common_pb2.Delta:
    finish = chunk.finish_reason
    stop_reason = chunk.stop_str if chunk.stop_str is not None else out.stop_reason
    return common_pb2.Delta(
        token_ids=out.new_token_ids,
        text=chunk.content,
        reasoning_text=chunk.reasoning,
        logprobs=pb.logprobs_to_pb(out.new_logprobs),
        finish_reason=pb.FINISH_REASONS.get(finish or "", common_pb2.FINISH_REASON_UNSPECIFIED),
        usage=common_pb2.Usage(
            prompt_tokens=out.num_prompt_tokens,
            completion_tokens=out.num_output_tokens,
            cached_tokens=out.num_cached_tokens,
            reasoning_tokens=text.num_reasoning_tokens,
        ),
        stop_reason="" if stop_reason is None or not finish else str(stop_reason),
    )


@dataclass(frozen=True)
class DecodeServiceConfig:
    engine: EngineArgs
    address: str = "127.0.0.1:50062"
    kv_bind: str = "tcp://127.0.0.1:0"
    """Where the KV receiver listens (tcp://HOST:PORT or ipc:///path)."""
    kv_advertise_host: str | None = None
    """Host prefill should dial when `kv_bind` listens on 0.0.0.0."""
    grace_s: float = 10.0


def serve(config: DecodeServiceConfig) -> int:
    """Load the model, serve until SIGTERM; non-zero exit when the engine died."""
    engine = LLMEngine(config.engine)
    transport = ZmqTransport(advertise_host=config.kv_advertise_host)
    receiver = transport.receiver(engine.runner.kv_caches, config.kv_bind)
    role = DecodeRole(engine, receiver)
    loop = EngineLoop(role, name="tandem-decode")
    loop.start()
    log.info("KV receiver on %s", receiver.endpoint)

    def add(server: grpc.aio.Server) -> None:
        engine_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(loop, role), server)

    async def main() -> int:
        process = ServiceProcess.create(add, ["tandem.v1.Decode"], config.address)

        async def on_stop() -> None:
            await asyncio.to_thread(loop.stop)
            receiver.close()

        return await process.serve_until_stopped(
            lambda: loop.is_alive, grace_s=config.grace_s, on_stop=on_stop
        )

    try:
        return asyncio.run(main())
    finally:
        engine.shutdown()  # tensor-parallel workers, if any
