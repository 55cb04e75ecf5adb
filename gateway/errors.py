"""The gateway's domain errors and the one table that maps them to HTTP replies.

Every reply that is not a success has OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``. Bad input is never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


class ClientDisconnectedError(GatewayError):
    """The client closed the connection before the response was ready (499, never seen)."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    code: str


# Most specific first: the first matching class wins.
ERROR_TABLE: tuple[tuple[type[Exception], ErrorKind], ...] = (
    (PromptTooLongError, ErrorKind(400, "invalid_request_error", "context_length_exceeded")),
    (TooManyMediaError, ErrorKind(400, "invalid_request_error", "too_many_media")),
    (InvalidRequestError, ErrorKind(400, "invalid_request_error", "invalid_request")),
    (AuthenticationError, ErrorKind(401, "invalid_request_error", "invalid_api_key")),
    (ModelNotFoundError, ErrorKind(404, "invalid_request_error", "model_not_found")),
    (PayloadTooLargeError, ErrorKind(413, "invalid_request_error", "request_too_large")),
    (OverloadedError, ErrorKind(503, "server_error", "overloaded")),
    (BackendUnavailableError, ErrorKind(503, "server_error", "backend_unavailable")),
    (ClientDisconnectedError, ErrorKind(499, "invalid_request_error", "client_closed_request")),
)
_INTERNAL = ErrorKind(500, "server_error", "internal_error")


def error_kind(exc: BaseException) -> ErrorKind:
    """Status, type and code for an exception (500 only for genuine bugs)."""
    if isinstance(exc, MediaFetchError):
        error_type = "invalid_request_error" if exc.status < 500 else "server_error"
        return ErrorKind(exc.status, error_type, "media_fetch_failed")
    for cls, kind in ERROR_TABLE:
        if isinstance(exc, cls):
            return kind
    return _INTERNAL


def error_body(
    message: str, kind: ErrorKind, param: str | None = None
) -> dict[str, dict[str, Any]]:
    return {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, extra headers) for any exception."""
    kind = error_kind(exc)
    if isinstance(exc, GatewayError):
        message = exc.message
    elif isinstance(exc, MediaFetchError):
        message = exc.reason
    else:
        message = "internal server error"
    headers: dict[str, str] = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    param = exc.param if isinstance(exc, GatewayError) else None
    return kind.status, error_body(message, kind, param), headers
