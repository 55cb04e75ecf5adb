"""The gateway's domain errors and the one table that maps them to HTTP and gRPC replies.

Every REST reply that is not a success has OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``; the gRPC API answers the same errors
with the status code of the same table row. Bad input is never a 500 / INTERNAL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from grpc import StatusCode

from gateway.media import MediaFetchError


class GatewayError(Exception):
    """Base: a request the gateway answers with a non-2xx status."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(GatewayError):
    """A field, message or media item the gateway cannot serve (400)."""


class PromptTooLongError(InvalidRequestError):
    """Prompt (plus max_tokens) exceeds max_model_len (400)."""


class TooManyMediaError(InvalidRequestError):
    """More images or videos than --limit-mm-per-prompt allows (400)."""


class AuthenticationError(GatewayError):
    """Missing or wrong API key (401)."""


class ModelNotFoundError(GatewayError):
    """The request names a model this server does not serve (404)."""


class PayloadTooLargeError(GatewayError):
    """The request body is over the size limit (413)."""


class OverloadedError(GatewayError):
    """The queue is full; retry later (503 with Retry-After)."""

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailableError(GatewayError):
    """The backend failed or is shutting down (503)."""


class UpstreamTimeoutError(GatewayError):
    """The backend did not answer within the upstream timeout (504)."""


class ClientDisconnectedError(GatewayError):
    """The client closed the connection before the response was ready (499, never seen)."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    code: str
    grpc_code: StatusCode = StatusCode.UNKNOWN


# Most specific first: the first matching class wins.
_BAD = "invalid_request_error"
_INVALID = StatusCode.INVALID_ARGUMENT
ERROR_TABLE: tuple[tuple[type[Exception], ErrorKind], ...] = (
    (PromptTooLongError, ErrorKind(400, _BAD, "context_length_exceeded", _INVALID)),
    (TooManyMediaError, ErrorKind(400, _BAD, "too_many_media", _INVALID)),
    (InvalidRequestError, ErrorKind(400, _BAD, "invalid_request", _INVALID)),
    (AuthenticationError, ErrorKind(401, _BAD, "invalid_api_key", StatusCode.UNAUTHENTICATED)),
    (ModelNotFoundError, ErrorKind(404, _BAD, "model_not_found", StatusCode.NOT_FOUND)),
    (PayloadTooLargeError, ErrorKind(413, _BAD, "request_too_large", _INVALID)),
    (OverloadedError, ErrorKind(503, "server_error", "overloaded", StatusCode.RESOURCE_EXHAUSTED)),
    (
        BackendUnavailableError,
        ErrorKind(503, "server_error", "backend_unavailable", StatusCode.UNAVAILABLE),
    ),
    (
        UpstreamTimeoutError,
        ErrorKind(504, "server_error", "upstream_timeout", StatusCode.DEADLINE_EXCEEDED),
    ),
    (ClientDisconnectedError, ErrorKind(499, _BAD, "client_closed_request", StatusCode.CANCELLED)),
)
_INTERNAL = ErrorKind(500, "server_error", "internal_error", StatusCode.INTERNAL)
# Media fetch errors carry their HTTP status (400, 502 or 504); the gRPC code follows it.
_MEDIA_GRPC_CODES: Mapping[int, StatusCode] = {
    502: StatusCode.UNAVAILABLE,
    504: StatusCode.DEADLINE_EXCEEDED,
}


def error_kind(exc: BaseException) -> ErrorKind:
    """Status, type and code for an exception (500 only for genuine bugs)."""
    if isinstance(exc, MediaFetchError):
        error_type = "invalid_request_error" if exc.status < 500 else "server_error"
        grpc_code = _MEDIA_GRPC_CODES.get(exc.status, _INVALID)
        return ErrorKind(exc.status, error_type, "media_fetch_failed", grpc_code)
    for cls, kind in ERROR_TABLE:
        if isinstance(exc, cls):
            return kind
    return _INTERNAL


def error_body(
    message: str, kind: ErrorKind, param: str | None = None
) -> dict[str, dict[str, Any]]:
    return {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}


def error_message(exc: BaseException) -> str:
    """What the client is told (never a traceback or an internal detail)."""
    if isinstance(exc, GatewayError):
        return exc.message
    if isinstance(exc, MediaFetchError):
        return exc.reason
    return "internal server error"


def grpc_status(exc: BaseException) -> tuple[StatusCode, str]:
    """The gRPC status code and details for any exception (same table as HTTP)."""
    return error_kind(exc).grpc_code, error_message(exc)


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """One line and the offending top-level field from pydantic's validation errors."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    where = ".".join(loc)
    message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "")
    return message, (loc[0] if loc else None)


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, extra headers) for any exception."""
    kind = error_kind(exc)
    message = error_message(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    param = exc.param if isinstance(exc, GatewayError) else None
    return kind.status, error_body(message, kind, param), headers
