"""What the KV cache needs to know about a request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol


class MediaSpan(NamedTuple):
    """An image or video inside a prompt: ``length`` placeholder tokens from ``offset``.

    ``content_hash`` identifies the pixels (e.g. a digest of the decoded media), so two
    different images behind identical placeholder token ids never share KV.
    """

    offset: int
    length: int
    content_hash: str


class CacheableRequest(Protocol):
    """The request fields :class:`KVCacheManager` reads; the scheduler's request fits.

    ``token_ids`` holds the prompt followed by every generated token so far; it only
    grows (the manager memoises block hashes by request id).
    """

    @property
    def request_id(self) -> str: ...

    @property
    def token_ids(self) -> Sequence[int]: ...

    @property
    def media_spans(self) -> Sequence[MediaSpan]: ...

    @property
    def cache_salt(self) -> str | None: ...


@dataclass
class KVCacheRequest:
    """A plain :class:`CacheableRequest` (tests, tools)."""

    request_id: str
    token_ids: list[int]
    media_spans: Sequence[MediaSpan] = field(default_factory=tuple)
    cache_salt: str | None = None
    """Isolates prefix-cache entries, e.g. per tenant: it keys the first block."""
