"""A generation request inside the engine, and the life cycle it moves through."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.kv_cache.request import MediaSpan as CacheSpan
from engine.multimodal import MediaInput, PreparedPrompt
from engine.sampler import RequestSamplingState
from engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered: everything from FINISHED_STOPPED on is final."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI `finish_reason` of a final status."""
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


@dataclass
class Request:
    request_id: str
    prompt: PreparedPrompt
    media: list[MediaInput]
    params: SamplingParams
    sampling: RequestSamplingState
    max_tokens: int
    arrival: int = 0
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending: int = 0
    """Tokens sampled by a step still in flight, not appended yet (async scheduling): the
    scheduler counts them as input for the step after it."""
    num_cached_tokens: int = 0
    cache_salt: str | None = None
    stop_reason: int | str | None = None

    @property
    def token_ids(self) -> list[int]:
        """Prompt then output: what the KV cache holds (or will) for this request."""
        return self.prompt.token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt.token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    @property
    def media_spans(self) -> list[CacheSpan]:
        return [
            CacheSpan(s.offset, s.length, m.content_hash)
            for s, m in zip(self.prompt.spans, self.media, strict=True)
        ]


@dataclass
class RequestOutput:
    """What one engine step produced for one request (a diff, not the whole state)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    new_logprobs: list[dict[int, float]] | None = None
    error: str | None = None
