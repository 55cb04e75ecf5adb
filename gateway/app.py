"""The OpenAI-compatible REST app: routes are thin, the services do the work.

    app = create_app(backend, tokenizer, chat_template, GatewayConfig(...))

`POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models` (guarded by the API
key when one is set), `GET /health` (200 only while the backend's `check_health()` is
true: readiness, it covers every service behind the backend), `GET /live` (the process
answers, whatever the backend's state: liveness) and, when asked, `GET /metrics`. Every
error has OpenAI's shape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from chat.template import ChatTemplate
from chat.tokenizer import Tokenizer
from gateway.backend import Backend, StatsSource
from gateway.errors import (
    ErrorKind,
    GatewayError,
    InvalidRequestError,
    error_body,
    error_payload,
    validation_message,
)
from gateway.http import BodyLimitMiddleware, SSEResponse, cancel_on_disconnect
from gateway.media import MediaFetchConfig, MediaFetcher, MediaFetchError
from gateway.metrics import GatewayMetrics, MetricsMiddleware
from gateway.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from gateway.serving import ServingContext, UpstreamBackend, check_api_key
from gateway.serving_chat import ChatService
from gateway.serving_completion import CompletionService

log = logging.getLogger("tandem.gateway")
MIB = 1024 * 1024


@dataclass(frozen=True)
class GatewayConfig:
    """How the REST front behaves; one instance per app."""

    api_key: str | None = None
    """Bearer token every /v1 route requires; None = open."""
    served_model_names: tuple[str, ...] = ()
    """Names the model answers to (besides "default" and "null"); () = the backend's name."""
    limit_mm_per_prompt: Mapping[str, int] = field(default_factory=dict)
    """Most images / videos in one request (`--limit-mm-per-prompt`); missing = no limit."""
    max_request_body_bytes: int = 128 * MIB
    """Larger bodies get 413 (data: URLs make chat bodies big; 128 MiB holds ~90 MiB media)."""
    media: MediaFetchConfig = field(default_factory=MediaFetchConfig)
    serve_metrics: bool = True
    """Serve /metrics on this app (when --metrics-port equals --port)."""
    upstream_timeout_s: float | None = 600.0
    """Longest wait for the backend (a media item encoded, the first token, each next
    one); past it the request is cancelled and answered 504 / DEADLINE_EXCEEDED. None = no
    limit. Generous by default: a queued request waits for others to finish."""
    health_timeout_s: float = 5.0
    """Longest wait for the backend's health check behind /health and gRPC health; past
    it the answer is 503 / NOT_SERVING."""

    def __post_init__(self) -> None:
        if self.max_request_body_bytes <= 0:
            raise ValueError("max_request_body_bytes must be positive")
        if self.upstream_timeout_s is not None and self.upstream_timeout_s <= 0:
            raise ValueError("upstream_timeout_s must be positive (or None for no limit)")
        if self.health_timeout_s <= 0:
            raise ValueError("health_timeout_s must be positive")
        for kind, limit in self.limit_mm_per_prompt.items():
            if kind not in ("image", "video") or not isinstance(limit, int) or limit < 0:
                raise ValueError(
                    f"limit_mm_per_prompt takes image/video counts >= 0, got {kind!r}: {limit!r}"
                )


def create_app(
    backend: Backend,
    tokenizer: Tokenizer,
    chat_template: ChatTemplate,
    config: GatewayConfig | None = None,
    metrics: GatewayMetrics | None = None,
) -> FastAPI:
    config = config or GatewayConfig()
    metrics = metrics or GatewayMetrics()
    if isinstance(backend, StatsSource):
        metrics.watch(backend)
    ctx = ServingContext(
        UpstreamBackend(backend, metrics, config.upstream_timeout_s, config.health_timeout_s),
        tokenizer,
        chat_template,
        MediaFetcher(config.media),
        dict(config.limit_mm_per_prompt),
        config.served_model_names,
    )
    app = FastAPI(title="Tandem", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    app.state.config = config
    app.state.metrics = metrics
    _add_error_handlers(app)
    _add_routes(app, ctx, config)
    if config.serve_metrics:
        app.add_api_route("/metrics", metrics.endpoint, methods=["GET"])
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _api_key_guard(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        check_api_key(request.headers.get("authorization", ""), api_key)

    return check


def _add_routes(app: FastAPI, ctx: ServingContext, config: GatewayConfig) -> None:
    chat = ChatService(ctx)
    completion = CompletionService(ctx)
    guarded = [Depends(_api_key_guard(config.api_key))]

    @app.get("/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if await ctx.backend.check_health() else 503)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> JSONResponse:
        cards = [
            ModelCard(id=name, root=ctx.backend.model_name, max_model_len=ctx.backend.max_model_len)
            for name in ctx.served_model_names
        ]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        run = await cancel_on_disconnect(raw, chat.start(req))
        if req.stream:
            return SSEResponse(chat.stream(run, req))
        response = await cancel_on_disconnect(raw, chat.collect(run, req))
        return JSONResponse(response.model_dump())

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        run = await cancel_on_disconnect(raw, completion.start(req))
        if req.stream:
            return SSEResponse(completion.stream(run, req))
        response = await cancel_on_disconnect(raw, completion.collect(run, req))
        return JSONResponse(response.model_dump())


def _error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = error_payload(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = validation_message(exc.errors())
        return _error_response(InvalidRequestError(message, param=param))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = ErrorKind(exc.status_code, "invalid_request_error", str(exc.status_code))
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error serving %s", request.url.path, exc_info=exc)
        return _error_response(exc)

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(MediaFetchError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
