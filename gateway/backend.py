"""The seam between the REST front and whatever generates tokens.

The gateway speaks token ids: it renders and tokenizes the prompt, hands the backend a
`GenerateRequest` and turns the `GenerateDelta`s it gets back into text (detokenizing,
stop strings and reasoning splitting stay on the front side). Two implementations:
`tandem.local_backend.LocalBackend` (the engine in-process, on its own thread, for
`--colocate`) and `tandem.grpc_backend.GrpcBackend` (a client of the vision, prefill and
decode services). Neither torch nor the engine leaks through here: media travel as an
opaque `EncodedMedia.payload` the backend itself produced.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

MediaKind = Literal["image", "video"]
EngineRole = Literal["both", "prefill", "decode"]


@dataclass(frozen=True)
class SamplingOptions:
    """Per-completion sampling knobs (the engine's `SamplingParams` vocabulary, n=1).

    Stop strings are not here: the gateway applies them to the text and closes the stream.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    max_tokens: int | None = 16
    """None = up to max_model_len (the backend resolves it)."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """Top logprobs per token; 0 = only the sampled token's; None = none."""
    seed: int | None = None
    reasoning_max_tokens: int | None = None


@dataclass(frozen=True)
class MediaItem:
    """Raw media bytes of one image or video, as fetched from the request."""

    kind: MediaKind
    data: bytes
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """FastDeploy's per-video fields (fps, max_frames, ...); empty for images."""


@dataclass(frozen=True)
class EncodedMedia:
    """A preprocessed item: what the gateway needs to expand its placeholder, plus an
    opaque payload only the backend that made it understands."""

    kind: MediaKind
    grid: tuple[int, int, int]
    """(t, h, w) in vision patches."""
    num_tokens: int
    """Placeholder tokens the item occupies in the prompt."""
    content_hash: str
    payload: Any = None


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    media: list[EncodedMedia] = field(default_factory=list)


@dataclass(frozen=True)
class RequestTimings:
    """Where one request's time went inside the backend, in seconds, for the metrics.

    A backend fills what it measures, as soon as it knows it: `queue_s`, `prefill_s` and
    `kv_transfer_s` on the first delta with tokens, `decode_s` on the last; None = not
    measured (here).
    """

    queue_s: float | None = None
    """Arrival at the backend → first scheduled."""
    prefill_s: float | None = None
    """First scheduled → first token (prompt processing, chunked or not)."""
    decode_s: float | None = None
    """First token → last token."""
    kv_transfer_s: float | None = None
    """Disaggregated: decode's reservation handed out → the prompt's KV (and the first
    token) all arrived from prefill."""


@dataclass(frozen=True)
class GenerateDelta:
    """What changed for one request since the last delta."""

    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    """Per new token: {token id: logprob}, the sampled token first, then the top ones."""
    finished: bool = False
    finish_reason: str | None = None
    """'stop' | 'length' | 'abort' once finished."""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    timings: RequestTimings | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of one engine (one role) behind the backend.

    None = this engine does not report the field; /metrics then leaves it out rather than
    export a zero it never measured.
    """

    role: EngineRole
    num_requests_running: int | None = None
    num_requests_waiting: int | None = None
    num_kv_blocks_used: int | None = None
    """Blocks held by at least one request: 0 whenever the engine is idle (else a leak)."""
    num_kv_blocks_total: int | None = None
    num_prefix_cache_queries: int | None = None
    """Prompt tokens looked up in the prefix cache since start (a counter)."""
    num_prefix_cache_hits: int | None = None
    """Of those, tokens found (a counter)."""


@dataclass(frozen=True)
class VisionCacheStats:
    """The vision service's embedding cache (counters since its start, bytes now)."""

    num_hits: int
    num_misses: int
    num_evictions: int
    num_bytes: int
    """Embedding bytes held now."""


@dataclass(frozen=True)
class BackendStats:
    engines: tuple[EngineStats, ...]
    """One per role the backend runs: (`both`,) in one process, (prefill, decode) split."""
    num_kv_transfer_failures: int | None = None
    """KV transfers between prefill and decode that failed since start (a counter); None =
    not reported (a backend without KV transfers)."""
    vision: VisionCacheStats | None = None
    """The vision service's embedding cache; None = no vision service, or it did not
    answer."""


@runtime_checkable
class StatsSource(Protocol):
    """The optional part of a backend: a cheap, non-blocking snapshot for /metrics."""

    def stats(self) -> BackendStats: ...


@runtime_checkable
class Backend(Protocol):
    """What the REST app needs from a token generator."""

    model_name: str
    max_model_len: int

    async def encode_media(self, item: MediaItem) -> EncodedMedia:
        """Preprocess one image or video (raises `InvalidRequestError` on bad media)."""
        ...

    def generate(self, req: GenerateRequest) -> AsyncGenerator[GenerateDelta, None]:
        """Stream deltas until one has `finished`. Closing the iterator (or cancelling
        the task iterating it) cancels the request. Raises `GatewayError`s: bad input
        (400), prompt over max_model_len (400), queue full (503)."""
        ...

    async def check_health(self) -> bool:
        """True while the backend can serve requests: every service behind it answers
        (the gateway's /health and gRPC health follow this)."""
        ...

    # Optional: `stats() -> BackendStats` (see `StatsSource`), read at each /metrics scrape.
