"""The one error type of media fetching, with the HTTP status the gateway answers.

Status policy (the gateway's error table maps ``.status`` straight to the HTTP reply):

* 400 — the client's URL is refused or unusable: malformed URL, scheme not allowed, a
  private/loopback address (also after a redirect), too many redirects, bad ``data:`` URL,
  local file outside the allowed folder or missing, media over the size cap, a host name
  that does not resolve, an upstream 4xx (the URL the client gave points at nothing).
* 502 — the upstream server failed us: 5xx or another non-2xx answer, connection refused
  or reset, a broken HTTP message, a TLS failure.
* 504 — a connect, read or overall deadline passed.
"""

from __future__ import annotations

from http import HTTPStatus


class MediaFetchError(Exception):
    """Media could not be fetched; ``status`` is the HTTP status to answer with.

    ``reason`` is meant for the client: it names what was refused and why, never a
    traceback. ``upstream_status`` is the remote server's status when one answered.
    """

    def __init__(self, status: int, reason: str, *, upstream_status: int | None = None) -> None:
        super().__init__(reason)
        self.status = int(status)
        self.reason = reason
        self.upstream_status = upstream_status

    def __repr__(self) -> str:
        return f"MediaFetchError(status={self.status}, reason={self.reason!r})"

    @classmethod
    def bad_request(cls, reason: str, *, upstream_status: int | None = None) -> MediaFetchError:
        """The client's URL or its content is refused (400)."""
        return cls(HTTPStatus.BAD_REQUEST, reason, upstream_status=upstream_status)

    @classmethod
    def bad_gateway(cls, reason: str, *, upstream_status: int | None = None) -> MediaFetchError:
        """The upstream server failed or answered badly (502)."""
        return cls(HTTPStatus.BAD_GATEWAY, reason, upstream_status=upstream_status)

    @classmethod
    def timeout(cls, reason: str) -> MediaFetchError:
        """A connect, read or overall deadline passed (504)."""
        return cls(HTTPStatus.GATEWAY_TIMEOUT, reason)
