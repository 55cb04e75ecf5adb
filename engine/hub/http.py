"""HTTP plumbing shared by the hub adapters and the downloader: retries and status mapping.

One rule for every request: 401/403/404 mean "no such repo (for you)" and are not retried;
429, 5xx and transport errors (refused, reset, timed out, cut mid-body) are retried with
exponential backoff and end as `HubConnectionError`; any other 4xx is reported as is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from engine.hub.errors import HubConnectionError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Statuses a hub uses for "this repo does not exist" (Hugging Face answers 401 to anonymous
# requests for unknown repos so as not to leak private names).
NOT_FOUND_STATUSES = frozenset({401, 403, 404})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failing request is retried."""

    attempts: int = 6
    """Tries per request, the first included; >= 1."""
    backoff_s: float = 1.0
    """Sleep before the second try; doubles each time after."""
    max_backoff_s: float = 30.0
    """Upper bound on one sleep."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("RetryPolicy backoff times must be >= 0")

    def delay(self, attempt: int) -> float:
        """Seconds to sleep after failed try number `attempt` (0-based)."""
        return min(self.max_backoff_s, self.backoff_s * (2**attempt))


class TransientError(Exception):
    """A failure worth retrying (server overloaded, 5xx, body cut short)."""


def with_retries(fn: Callable[[], T], *, retry: RetryPolicy, what: str, hint: str) -> T:
    """Run `fn`, retrying transport and transient errors; raise `HubConnectionError` at the end.

    `what` names the operation for the message ("listing files of org/name on huggingface"),
    `hint` tells the user what to check (usually the endpoint env var).
    """
    last: Exception | None = None
    for attempt in range(retry.attempts):
        try:
            return fn()
        except (httpx.TransportError, TransientError) as exc:
            last = exc
            if attempt + 1 < retry.attempts:
                delay = retry.delay(attempt)
                log.warning("%s failed (%s); retry %d in %.1fs", what, exc, attempt + 1, delay)
                time.sleep(delay)
    detail = f"{type(last).__name__}: {last}" if last else "unknown error"
    raise HubConnectionError(
        f"{what} failed after {retry.attempts} attempt(s) ({detail}). {hint}"
    ) from last


def check_status(resp: httpx.Response, *, what: str, not_found: Callable[[int], Exception]) -> None:
    """Map a response's status to our errors; return quietly for 2xx/3xx.

    `not_found(status)` builds the error for 401/403/404, which only the caller can word.
    """
    code = resp.status_code
    if code in NOT_FOUND_STATUSES:
        raise not_found(code)
    if code == 429 or code >= 500:
        raise TransientError(f"HTTP {code} from {resp.request.url}")
    if code >= 400:
        body = resp.read()[:200].decode(errors="replace")
        raise HubConnectionError(f"{what}: HTTP {code} from {resp.request.url} {body}".rstrip())


def json_body(resp: httpx.Response, *, what: str) -> Any:
    """The response's JSON, or a `HubConnectionError` naming the URL when it is not JSON."""
    try:
        return resp.json()
    except ValueError as exc:
        raise HubConnectionError(
            f"{what}: {resp.request.url} did not answer with JSON (is the endpoint a hub?)"
        ) from exc
