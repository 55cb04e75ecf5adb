"""What chat and completion serving share: the context, model-name check, sampling options,
prompt-length check, usage, logprob tokens and SSE framing."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from chat.multimodal import MediaTokens
from chat.template import ChatTemplate
from chat.tokenizer import Tokenizer
from gateway.backend import (
    Backend,
    EncodedMedia,
    GenerateDelta,
    GenerateRequest,
    MediaItem,
    SamplingOptions,
)
from gateway.errors import (
    AuthenticationError,
    InvalidRequestError,
    ModelNotFoundError,
    PromptTooLongError,
    UpstreamTimeoutError,
    error_payload,
)
from gateway.generation import ChoiceDecoder
from gateway.media import MediaFetcher
from gateway.metrics import GatewayMetrics
from gateway.protocol import (
    CompletionTokensDetails,
    PromptTokensDetails,
    SamplingFields,
    Usage,
)

log = logging.getLogger("tandem.gateway")

MODEL_ALIASES = frozenset({"default", "null"})
"""Names accepted for the served model besides its own (FastDeploy's client sends "null")."""


class UpstreamBackend:
    """The backend as REST and gRPC both see it: every wait for it has a deadline (504 /
    DEADLINE_EXCEEDED past it, and the request is cancelled upstream), and every stream is
    timed for the metrics."""

    def __init__(
        self,
        inner: Backend,
        metrics: GatewayMetrics,
        timeout_s: float | None,
        health_timeout_s: float = 5.0,
    ) -> None:
        self.inner = inner
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.health_timeout_s = health_timeout_s
        self.model_name = inner.model_name
        self.max_model_len = inner.max_model_len

    async def check_health(self) -> bool:
        """The backend's own verdict, within `health_timeout_s`; a probe that hangs or
        fails counts as unhealthy (503 / NOT_SERVING), never as an error."""
        try:
            async with asyncio.timeout(self.health_timeout_s):
                return bool(await self.inner.check_health())
        except TimeoutError:
            return False
        except Exception:
            log.exception("the backend's health check failed")
            return False

    async def encode_media(self, item: MediaItem) -> EncodedMedia:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self.inner.encode_media(item)
        except TimeoutError:
            raise self._timed_out("encoding a media item") from None

    async def generate(self, req: GenerateRequest) -> AsyncGenerator[GenerateDelta, None]:
        timer = self.metrics.request_timer()
        async with aclosing(self.inner.generate(req)) as stream:
            while True:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        delta = await anext(stream)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise self._timed_out("waiting for tokens") from None
                timer.on_delta(delta)
                try:
                    yield delta
                except GeneratorExit:  # closed by a stop string or a gone client
                    timer.end()
                    raise
                if delta.finished:
                    break

    def _timed_out(self, what: str) -> UpstreamTimeoutError:
        return UpstreamTimeoutError(
            f"the model backend did not answer within {self.timeout_s:g} s ({what})"
        )


@dataclass
class ServingContext:
    """Everything a request handler needs; built once by `create_app`."""

    backend: Backend
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    media_fetcher: MediaFetcher
    limit_mm_per_prompt: Mapping[str, int] = field(default_factory=dict)
    served_model_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.served_model_names = self.served_model_names or (self.backend.model_name,)
        self.media_tokens = _media_tokens(self.tokenizer)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def response_model(self, requested: str | None) -> str:
        """The model name a response reports; 404 for a model this server lacks."""
        if requested is None:
            return "default"
        if requested in self.served_model_names or requested in MODEL_ALIASES:
            return requested
        raise ModelNotFoundError(
            f"The model `{requested}` does not exist; this server serves {self.model_name!r}",
            param="model",
        )


def _media_tokens(tokenizer: Tokenizer) -> MediaTokens | None:
    try:
        return MediaTokens.from_tokenizer(tokenizer)
    except ValueError:
        return None  # a text-only tokenizer: media parts are refused per request


def check_api_key(authorization: str, api_key: str | None) -> None:
    """Refuse (401 / UNAUTHENTICATED) unless `authorization` is `Bearer <api_key>`; a
    server without a key lets everyone in."""
    if api_key is None:
        return
    scheme, _, token = authorization.partition(" ")
    # bytes, not str: compare_digest refuses non-ASCII str (a 500 for a junk header)
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    ):
        raise AuthenticationError("Incorrect API key provided")


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4()}"


def sampling_options(
    req: SamplingFields, max_tokens: int | None, logprobs: int | None
) -> SamplingOptions:
    """The request's sampling fields; unset ones take the engine's defaults."""
    if max_tokens is not None and req.min_tokens is not None and req.min_tokens > max_tokens:
        raise InvalidRequestError("min_tokens must be <= max_tokens", param="min_tokens")
    if (
        max_tokens is not None
        and req.reasoning_max_tokens is not None
        and req.reasoning_max_tokens > max_tokens
    ):
        raise InvalidRequestError(
            "reasoning_max_tokens must be <= max_tokens", param="reasoning_max_tokens"
        )
    if any(t < 0 for t in req.stop_token_ids or ()):
        raise InvalidRequestError("stop_token_ids must be >= 0", param="stop_token_ids")
    if any(not s for s in req.stop_strings()):
        raise InvalidRequestError("stop strings must not be empty", param="stop")
    return SamplingOptions(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        min_tokens=req.min_tokens or 0,
        max_tokens=max_tokens,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        seed=req.seed,
        reasoning_max_tokens=req.reasoning_max_tokens,
    )


def check_prompt_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """400 before any work when the prompt cannot fit (the engine checks again)."""
    if num_prompt_tokens >= max_model_len:
        raise PromptTooLongError(
            f"The prompt has {num_prompt_tokens} tokens; this model's maximum context length "
            f"is {max_model_len} tokens (max_model_len), leaving room for one output token",
            param="messages",
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise PromptTooLongError(
            f"The prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds "
            f"this model's maximum context length of {max_model_len} tokens",
            param="max_tokens",
        )


def usage_of(num_prompt_tokens: int, decoders: Sequence[ChoiceDecoder]) -> Usage:
    completion = sum(len(d.token_ids) for d in decoders)
    cached = decoders[0].num_cached_tokens if decoders else 0
    return Usage(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=completion,
        total_tokens=num_prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=sum(d.num_reasoning_tokens for d in decoders)
        ),
    )


def sse(payload: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: BaseException) -> str:
    """An error after the stream has started: OpenAI's error object as one event."""
    _, body, _ = error_payload(exc)
    return sse(body)
