"""``MediaFetcher``: one entry point for every way a request can name its media."""

from __future__ import annotations

import asyncio
import re
import ssl

from gateway.media.address import HostAllowList, Resolver, resolve_host
from gateway.media.config import MediaFetchConfig, MediaKind
from gateway.media.data_url import decode_data_url
from gateway.media.errors import MediaFetchError
from gateway.media.http_fetch import HTTP_SCHEMES, HttpFetcher
from gateway.media.local_file import read_local_file

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# Decoding a large data: URL takes long enough to stall every other request on the event
# loop, so big ones go to a thread; small ones are not worth the hop.
_DECODE_IN_THREAD_CHARS = 1024 * 1024


def scheme_of(url: str) -> str | None:
    """The URL's scheme, lower-cased, or None for a bare path."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else None


class MediaFetcher:
    """Fetches the bytes of one image or video: http(s), ``data:``, ``file://`` or a path.

    Everything a URL string can do wrong ends in ``MediaFetchError``; the whole fetch,
    redirects and file reads included, runs under ``total_timeout_s``.
    """

    def __init__(
        self,
        config: MediaFetchConfig,
        *,
        resolver: Resolver = resolve_host,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``resolver`` and ``ssl_context`` are seams for tests (fake DNS, a test CA); the
        default context trusts certifi's CA bundle."""
        self._config = config
        self._http = HttpFetcher(
            config,
            HostAllowList.parse(config.allow_hosts),
            resolver,
            ssl_context,
        )

    async def fetch(self, url: str, kind: MediaKind) -> bytes:
        """Return the media ``url`` names, at most ``config.max_bytes(kind)`` bytes."""
        if kind not in ("image", "video"):
            raise ValueError(f"unknown media kind {kind!r}")
        if not isinstance(url, str):
            raise MediaFetchError.bad_request("media URL must be a string")
        max_bytes = self._config.max_bytes(kind)
        try:
            async with asyncio.timeout(self._config.total_timeout_s):
                data = await self._fetch_any(url.strip(), kind, max_bytes)
        except TimeoutError as exc:
            raise MediaFetchError.timeout(
                f"fetching media took longer than {self._config.total_timeout_s:g} s"
            ) from exc
        if not data:
            raise MediaFetchError.bad_request("media is empty")
        return data

    async def _fetch_any(self, url: str, kind: MediaKind, max_bytes: int) -> bytes:
        """Dispatch on the scheme; a bare path counts as ``file``."""
        if not url:
            raise MediaFetchError.bad_request("media URL is empty")
        source = scheme_of(url) or "file"
        if source not in self._config.allowed_schemes:
            raise MediaFetchError.bad_request(f"media URL scheme {source[:16]!r} is not allowed")
        if source in HTTP_SCHEMES:
            return await self._http.fetch(url, max_bytes)
        if source == "data":
            if len(url) > _DECODE_IN_THREAD_CHARS:
                return await asyncio.to_thread(decode_data_url, url, kind, max_bytes)
            return decode_data_url(url, kind, max_bytes)
        if source == "file":
            root = self._config.allowed_local_media_path
            return await asyncio.to_thread(read_local_file, url, root, max_bytes)
        raise MediaFetchError.bad_request(f"media URL scheme {source[:16]!r} is not supported")
