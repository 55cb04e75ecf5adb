"""The public gRPC API, `tandem.v1.Generation/Generate`, served beside the REST app.

The servicer is a thin adapter: a `GenerateRequest` becomes the very `ChatCompletionRequest`
or `CompletionRequest` a REST route validates, the same `ChatService` / `CompletionService`
start it, and each `TextDelta` goes back as a `Delta` (answer in `text`, reasoning in
`reasoning_text`, usage and `stop_reason` on the last one). So both APIs share one code
path: validation, stop strings, reasoning split, upstream timeout and metrics. One
interceptor checks the API key (metadata `authorization: Bearer KEY`) and maps every error
to the status code of the error table's row (gateway/errors.py). A cancelled RPC cancels
the handler, which closes the backend streams: the request is aborted upstream.
`grpc.health.v1` (following the backend's health) and server reflection are on and need
no key.

`GrpcServer` runs in the event loop of the REST server and is shaped like `uvicorn.Server`
(`serve()`, `should_exit`, `force_exit`), so `tandem serve` starts and stops it with the
others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from typing import Any

import grpc
from fastapi import FastAPI
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from gateway.errors import InvalidRequestError, grpc_status, validation_message
from gateway.generation import Run, TextDelta
from gateway.metrics import GatewayMetrics
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.serving import ServingContext, check_api_key, usage_of
from gateway.serving_chat import ChatService
from gateway.serving_completion import CompletionService
from tandem.v1 import common_pb2, generation_pb2, generation_pb2_grpc

log = logging.getLogger("tandem.gateway.grpc")

DEFAULT_PORT = 8183
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
_API_PREFIX = f"/{SERVICE_NAME}/"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, ctx: ServingContext) -> None:
        self.chat = ChatService(ctx)
        self.completion = CompletionService(ctx)

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        run = await self._start(request)
        request_id = request.request_id or run.request_id
        async with aclosing(run.deltas()) as deltas:
            async for td in deltas:
                delta = _delta(td, run)
                yield generation_pb2.GenerateResponse(request_id=request_id, delta=delta)

    async def _start(self, request: generation_pb2.GenerateRequest) -> Run:
        kind = request.WhichOneof("input")
        if kind is None:
            raise InvalidRequestError("set one of tokens, chat or prompt", param="input")
        sampling = _sampling_fields(request.sampling)
        top_n = sampling.pop("logprobs", None)
        fields: dict[str, Any] = {"model": request.model or None, **sampling}
        if kind == "chat":
            chat = request.chat
            fields.update(messages=[_message(m) for m in chat.messages])
            fields.update(logprobs=top_n is not None, top_logprobs=top_n)
            if chat.HasField("enable_thinking"):
                fields["chat_template_kwargs"] = {"enable_thinking": chat.enable_thinking}
            with _invalid_fields():
                chat_req = ChatCompletionRequest.model_validate(fields)
            return (await self.chat.start(chat_req)).run
        prompt = list(request.tokens.token_ids) if kind == "tokens" else request.prompt
        fields.update(prompt=prompt, logprobs=top_n)
        with _invalid_fields():
            completion_req = CompletionRequest.model_validate(fields)
        return await self.completion.start(completion_req)


def _sampling_fields(params: common_pb2.SamplingParams) -> dict[str, Any]:
    """The fields the client set, by the REST names (the proto uses the same ones); unset
    ones keep the REST defaults, except max_tokens: unset = up to max_model_len."""
    fields: dict[str, Any] = {"max_tokens": None}
    for field, value in params.ListFields():
        fields[field.name] = value if isinstance(value, str | int | float | bool) else list(value)
    return fields


def _message(message: generation_pb2.ChatMessage) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    for part in message.content:
        kind = part.WhichOneof("part")
        if kind == "text":
            parts.append({"type": "text", "text": part.text})
        elif kind == "image_url":
            parts.append({"type": "image_url", "image_url": {"url": part.image_url}})
        elif kind == "video_url":
            parts.append({"type": "video_url", "video_url": {"url": part.video_url}})
        else:
            raise InvalidRequestError("a content part sets none of its fields", param="messages")
    return {"role": message.role, "content": parts}


@contextlib.contextmanager
def _invalid_fields() -> Iterator[None]:
    """Pydantic's refusal as the REST app words it (400 / INVALID_ARGUMENT)."""
    try:
        yield
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
        raise InvalidRequestError(message, param=param) from None


def _delta(td: TextDelta, run: Run) -> common_pb2.Delta:
    delta = common_pb2.Delta(
        token_ids=td.token_ids,
        text=td.content,
        reasoning_text=td.reasoning,
        logprobs=[
            common_pb2.Logprobs(
                entries=[common_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in top.items()]
            )
            for top in td.logprobs or ()
        ],
    )
    if td.finish_reason is not None:
        delta.finish_reason = _FINISH_REASONS.get(td.finish_reason, common_pb2.FINISH_REASON_STOP)
        if td.stop_reason is not None:
            delta.stop_reason = str(td.stop_reason)
        usage = usage_of(run.num_prompt_tokens, run.decoders)
        delta.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.prompt_tokens_details.cached_tokens,
                reasoning_tokens=usage.completion_tokens_details.reasoning_tokens,
            )
        )
    return delta


_StreamBehavior = Callable[[Any, grpc.aio.ServicerContext], AsyncGenerator[Any, None]]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """For `tandem.v1.Generation` calls (server-streaming, all of them): the API key check,
    then errors → status codes (one table), and a count per method and code. Health and
    reflection pass untouched: probes need no key."""

    def __init__(self, api_key: str | None, metrics: GatewayMetrics) -> None:
        self.api_key = api_key
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or handler.unary_stream is None or not method.startswith(_API_PREFIX):
            return handler
        metadata = dict(details.invocation_metadata or ())
        behavior = self._guard(handler.unary_stream, method, str(metadata.get("authorization", "")))
        return grpc.unary_stream_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _guard(self, inner: _StreamBehavior, method: str, authorization: str) -> _StreamBehavior:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator:
            code = grpc.StatusCode.OK
            try:
                check_api_key(authorization, self.api_key)
                async with aclosing(inner(request, context)) as stream:
                    async for item in stream:
                        yield item
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as exc:
                code, message = grpc_status(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("unhandled error serving %s", method, exc_info=exc)
                await context.abort(code, message)
            except BaseException:  # cancelled by the client, a deadline or shutdown
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                self.metrics.grpc_requests.labels(method, code.name).inc()

        return guarded


class GrpcServer:
    """The gRPC listener: Generation, health and reflection on `host:port`.

    `await serve()` runs until `should_exit` is set (then drains for `grace_s`, or not at
    all once `force_exit` is set), like `uvicorn.Server`. `port=0` picks a free port;
    `port` holds the bound one once `started`.
    """

    def __init__(
        self,
        ctx: ServingContext,
        metrics: GatewayMetrics,
        *,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        api_key: str | None = None,
        max_message_bytes: int = 128 * 1024 * 1024,
        grace_s: float = 5.0,
        health_poll_s: float = 2.0,
    ) -> None:
        self.ctx = ctx
        self.metrics = metrics
        self.host, self.port = host, port
        self.api_key = api_key
        self.max_message_bytes = max_message_bytes
        self.grace_s = grace_s
        self.health_poll_s = health_poll_s
        self.should_exit = False
        self.force_exit = False
        self.started = False
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._health_task: asyncio.Task[None] | None = None

    @classmethod
    def for_app(
        cls, app: FastAPI, *, host: str = "0.0.0.0", port: int = DEFAULT_PORT
    ) -> GrpcServer:
        """The gRPC twin of a `create_app` app: same context, metrics, key and size limit."""
        config = app.state.config
        return cls(
            app.state.ctx,
            app.state.metrics,
            host=host,
            port=port,
            api_key=config.api_key,
            max_message_bytes=config.max_request_body_bytes,
        )

    async def start(self) -> None:
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(
            interceptors=[ErrorInterceptor(self.api_key, self.metrics)], options=options
        )
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.ctx), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            self.port = server.add_insecure_port(f"{host}:{self.port}")
        except RuntimeError as exc:
            raise OSError(f"gRPC: cannot listen on {self.host}:{self.port} ({exc})") from None
        await server.start()
        self._server = server
        await self._set_health(await self.ctx.backend.check_health())
        self._health_task = asyncio.create_task(self._follow_backend_health())
        self.started = True
        log.info("gRPC %s listening on %s:%d", SERVICE_NAME, self.host, self.port)

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(None if self.force_exit else self.grace_s)

    async def serve(self) -> None:
        await self.start()
        try:
            while not self.should_exit:
                await asyncio.sleep(0.1)
        finally:
            await self.stop()

    async def _set_health(self, ok: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def _follow_backend_health(self) -> None:
        while True:
            await asyncio.sleep(self.health_poll_s)
            await self._set_health(await self.ctx.backend.check_health())
