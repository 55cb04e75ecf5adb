"""What every Tandem gRPC service process shares: the error table, health, reflection and
a graceful stop on SIGTERM.

* One error policy per process: `ErrorInterceptor` maps domain exceptions to status codes
  from `ERROR_CODES` (first matching class wins), so servicers just raise.
* `grpc.health.v1.Health` answers SERVING for the overall server and each service while
  the process can work, NOT_SERVING from the first SIGTERM on (load balancers drain it).
* Server reflection lists every service.
* SIGTERM/SIGINT: refuse new work (NOT_SERVING, then `server.stop(grace)` which rejects new
  RPCs and lets in-flight ones finish within `grace`), then exit. `serve_until_stopped`
  returns non-zero when the engine died (`is_healthy()` went False on its own).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger("tandem.services")


def _error_codes() -> list[tuple[type[BaseException], grpc.StatusCode]]:
    """The one table (order matters: subclasses before their bases)."""
    from engine.llm_engine import RequestError
    from engine.multimodal import PromptError
    from engine.roles.errors import (
        EngineStoppedError,
        NoCapacityError,
        TransferFailedError,
        TransferTimeoutError,
    )

    return [
        (NoCapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (TransferTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
        (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
        (TransferFailedError, grpc.StatusCode.ABORTED),
        (EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
        (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
        (PromptError, grpc.StatusCode.INVALID_ARGUMENT),
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    ]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _error_codes():
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain exceptions raised by servicers into gRPC statuses (see `status_for`)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unexpected error", exc_info=exc)
    await context.abort(code, str(exc) or type(exc).__name__)


def _wrap_unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc)

    return call


def _wrap_stream(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc)

    return call


@dataclass
class ServiceProcess:
    """A grpc.aio server with health + reflection; `serve_until_stopped` runs it."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    service_names: Sequence[str]
    port: int

    @classmethod
    def create(
        cls,
        add_servicers: Callable[[grpc.aio.Server], None],
        service_names: Sequence[str],
        address: str,
        *,
        max_message_mb: int = 256,
    ) -> ServiceProcess:
        size = max_message_mb * 1024 * 1024
        server = grpc.aio.server(
            interceptors=[ErrorInterceptor()],
            options=[
                ("grpc.max_send_message_length", size),
                ("grpc.max_receive_message_length", size),
                ("grpc.so_reuseport", 0),
            ],
        )
        add_servicers(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        return cls(server, health_servicer, list(service_names), port)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def serve_until_stopped(
        self,
        is_healthy: Callable[[], bool],
        *,
        grace_s: float = 10.0,
        on_stop: Callable[[], Awaitable[None]] | None = None,
    ) -> int:
        """Serve until SIGTERM/SIGINT or the engine dies; 0 on a clean stop, 1 otherwise."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.server.start()
        await self.set_serving(True)
        print(f"serving {', '.join(self.service_names)} on port {self.port}", flush=True)
        died = False
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except TimeoutError:
                if not is_healthy():
                    log.error("the engine died; stopping")
                    died = True
                    break
        await self.set_serving(False)
        await self.server.stop(grace_s)
        if on_stop is not None:
            await on_stop()
        return 1 if died else 0


async def wait_for_health(target: str, timeout_s: float, service: str = "") -> None:
    """Block until `target` answers SERVING for `service` ("" = the server as a whole), for
    orchestration and tests. Naming the service tells a server of another kind that happens
    to listen on the port (NOT_FOUND) from the one expected."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                request = health_pb2.HealthCheckRequest(service=service)
                reply = await stub.Check(request, timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{target} did not become healthy in {timeout_s:.0f} s")
            await asyncio.sleep(0.2)
