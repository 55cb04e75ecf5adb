"""The vision service's one error policy: domain exceptions → gRPC status codes.

* `MediaError` → INVALID_ARGUMENT with its reason: corrupt or unsupported media, bad
  options, and the size caps (`MediaTooLargeError`, `VideoTooLongError`);
* `PoolBusyError` (too many items in flight) → UNAVAILABLE with its reason;
* anything else → INTERNAL, detail "internal error" (traceback only in the log).

Oversized media are INVALID_ARGUMENT, not RESOURCE_EXHAUSTED: the item is over a
configured per-item cap, so retrying cannot help, and the gateway answers 400 as it does
for every other bad item (RESOURCE_EXHAUSTED reads as "retry later", HTTP 429). A request
over the transport's message limit is refused by gRPC itself with RESOURCE_EXHAUSTED.
Overload is UNAVAILABLE so Envoy and the gateway retry it elsewhere. Internal failures are
logged here with their traceback; the client sees no traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from vision_svc.pool import PoolBusyError
from vision_svc.processing import MediaError

log = logging.getLogger("tandem.vision.errors")

# Most specific first: the first matching class wins.
STATUS_TABLE: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (MediaError, grpc.StatusCode.INVALID_ARGUMENT),
    (PoolBusyError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and client-visible detail for `exc`."""
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary-unary handler with `STATUS_TABLE` (health and reflection pass)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise  # the servicer already chose a status
            except Exception as exc:
                code, detail = status_for(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", method)
                else:
                    log.info("%s: %s: %s", method, code.name, detail)
                await context.abort(code, detail)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
