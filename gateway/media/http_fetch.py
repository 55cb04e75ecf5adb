"""Fetching media over http(s) without letting a URL reach private addresses.

DNS rebinding: each hop resolves its host exactly once, checks every address, then
connects to a checked address by rewriting the request URL to that IP literal, so httpx
and httpcore never look the name up again. The original name still goes out where it
belongs: in the ``Host`` header (virtual hosting works) and, for https, in the
``sni_hostname`` request extension, which httpcore hands to ``ssl`` as ``server_hostname``:
TLS sends SNI for the name and verifies the certificate against the name, exactly as an
unpinned request would.

Redirects are followed by hand so that every hop goes through the same parse, resolve and
check as the first URL, and only to http(s).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from gateway.media.address import HostAllowList, IPAddress, Resolver, is_forbidden_address
from gateway.media.config import MediaFetchConfig
from gateway.media.errors import MediaFetchError

HTTP_SCHEMES = frozenset({"http", "https"})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_URL_CHARS = 8192
_USER_AGENT = "tandem-media-fetch/1"


@dataclass(frozen=True)
class _Redirect:
    """A hop answered with a redirect to ``location`` (not yet resolved or checked)."""

    location: str


def parse_http_url(text: str, allowed_schemes: frozenset[str]) -> httpx.URL:
    """Parse an http(s) URL and refuse what must never be fetched."""
    if len(text) > _MAX_URL_CHARS:
        raise MediaFetchError.bad_request(f"URL is longer than {_MAX_URL_CHARS} characters")
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
        raise MediaFetchError.bad_request(f"malformed URL: {exc}") from exc
    if url.scheme not in HTTP_SCHEMES or url.scheme not in allowed_schemes:
        raise MediaFetchError.bad_request(f"URL scheme {url.scheme[:16]!r} is not allowed")
    if not url.raw_host:
        raise MediaFetchError.bad_request("URL has no host")
    if url.userinfo:
        # Credentials would be sent to whichever host a redirect picks; never forward them.
        raise MediaFetchError.bad_request("media URLs must not carry user:password@")
    if url.port is not None and not 0 < url.port < 65536:
        raise MediaFetchError.bad_request(f"URL port {url.port} is out of range")
    if not url.raw_host.isascii():
        raise MediaFetchError.bad_request("URL host is not ASCII after IDNA encoding")
    return url


def host_header(url: httpx.URL) -> str:
    """The ``Host`` header the original URL implies (IPv6 bracketed, default port omitted)."""
    host = url.raw_host.decode("ascii")
    if ":" in host:
        host = f"[{host}]"
    return host if url.port is None else f"{host}:{url.port}"


def check_content_length(value: str | None, max_bytes: int) -> None:
    """Refuse a body announced larger than the cap before reading any of it."""
    if value is None:
        return
    try:
        length = int(value)
    except ValueError as exc:
        raise MediaFetchError.bad_gateway(f"invalid Content-Length {value[:32]!r}") from exc
    if length > max_bytes:
        raise MediaFetchError.bad_request(
            f"media is {length} bytes (Content-Length), more than the {max_bytes}-byte limit"
        )


async def read_capped(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """Collect a streamed body, failing as soon as it passes ``max_bytes``.

    Counts what actually arrives, whatever Content-Length said, so at most one chunk past
    the cap is ever read or held.
    """
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise MediaFetchError.bad_request(f"media is larger than the {max_bytes}-byte limit")
    return bytes(body)


class HttpFetcher:
    """Fetches one http(s) URL under the guard; the overall deadline is the caller's."""

    def __init__(
        self,
        config: MediaFetchConfig,
        allow_list: HostAllowList,
        resolver: Resolver,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self._config = config
        self._allow_list = allow_list
        self._resolver = resolver
        self._ssl_context = ssl_context
        self._timeout = httpx.Timeout(
            connect=config.connect_timeout_s,
            read=config.read_timeout_s,
            write=config.read_timeout_s,
            pool=config.connect_timeout_s,
        )

    def _verify_context(self) -> ssl.SSLContext:
        """The TLS context, built on first use: loading the CA bundle takes ~0.1 s."""
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()
        return self._ssl_context

    async def fetch(self, url_text: str, max_bytes: int) -> bytes:
        """GET ``url_text``, following at most ``max_redirects`` checked redirects."""
        url = parse_http_url(url_text, self._config.allowed_schemes)
        num_redirects = 0
        while True:
            outcome = await self._fetch_hop_translated(url, max_bytes)
            if isinstance(outcome, bytes):
                return outcome
            if num_redirects >= self._config.max_redirects:
                raise MediaFetchError.bad_request(
                    f"too many redirects (more than {self._config.max_redirects})"
                )
            num_redirects += 1
            try:
                target = str(url.join(outcome.location))
            except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
                raise MediaFetchError.bad_gateway(f"malformed redirect Location: {exc}") from exc
            url = parse_http_url(target, self._config.allowed_schemes)

    async def _fetch_hop_translated(self, url: httpx.URL, max_bytes: int) -> bytes | _Redirect:
        """One hop, with httpx's exceptions turned into MediaFetchError."""
        try:
            return await self._fetch_hop(url, max_bytes)
        except httpx.TimeoutException as exc:
            what = type(exc).__name__
            raise MediaFetchError.timeout(f"timed out fetching media ({what})") from exc
        except httpx.HTTPError as exc:
            what = str(exc) or type(exc).__name__
            raise MediaFetchError.bad_gateway(f"media server failed: {what}") from exc
        except httpx.InvalidURL as exc:
            raise MediaFetchError.bad_request(f"malformed URL: {exc}") from exc

    async def _fetch_hop(self, url: httpx.URL, max_bytes: int) -> bytes | _Redirect:
        """Resolve, check, then GET from the first checked address that accepts a connection."""
        addresses = await self._checked_addresses(url)
        failure: httpx.ConnectError | None = None
        for ip in addresses:
            try:
                return await self._get(url, ip, max_bytes)
            except httpx.ConnectError as exc:
                failure = exc  # dual-stack hosts: ::1 may refuse where 127.0.0.1 serves
        raise MediaFetchError.bad_gateway(f"cannot connect to {url.host}: {failure}")

    async def _checked_addresses(self, url: httpx.URL) -> list[IPAddress]:
        """All addresses of the URL's host; refuse the hop if any one is forbidden.

        Refusing on any (not filtering) stops a name that mixes public and private records
        from reaching the private one on a retry.
        """
        host = url.raw_host.decode("ascii")
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            async with asyncio.timeout(self._config.connect_timeout_s):
                addresses = await self._resolver(host, port)
        except TimeoutError as exc:
            raise MediaFetchError.timeout(f"timed out resolving {host[:255]}") from exc
        except (OSError, UnicodeError, ValueError) as exc:
            raise MediaFetchError.bad_request(f"cannot resolve host {host[:255]!r}") from exc
        if not addresses:
            raise MediaFetchError.bad_request(f"host {host[:255]!r} has no address")
        for ip in addresses:
            if is_forbidden_address(ip) and not self._allow_list.allows(host, ip):
                raise MediaFetchError.bad_request(
                    f"refusing {host[:255]}: it resolves to {ip}, which is not a public "
                    "address (allow it with --media-allow-hosts)"
                )
        return addresses

    async def _get(self, url: httpx.URL, ip: IPAddress, max_bytes: int) -> bytes | _Redirect:
        """GET ``url`` over a connection to ``ip``, keeping the URL's name for Host and TLS."""
        headers = {
            "Host": host_header(url),
            "Accept-Encoding": "identity",
            "User-Agent": _USER_AGENT,
        }
        # A fresh client per hop: the pool is keyed by IP, so a kept-alive TLS connection
        # verified for one name must never carry a request for another name on that IP.
        async with httpx.AsyncClient(
            verify=self._verify_context(), trust_env=False, timeout=self._timeout
        ) as client:
            request = client.build_request(
                "GET",
                url.copy_with(host=str(ip)),
                headers=headers,
                extensions={"sni_hostname": url.raw_host.decode("ascii")},
            )
            response = await client.send(request, stream=True)
            try:
                return await self._read_response(response, max_bytes)
            finally:
                await response.aclose()

    async def _read_response(self, response: httpx.Response, max_bytes: int) -> bytes | _Redirect:
        """The body of a 2xx answer, the target of a redirect, or an error with the status."""
        status = response.status_code
        if status in _REDIRECT_STATUSES:
            location = response.headers.get("location")
            if not location:
                raise MediaFetchError.bad_gateway(
                    f"redirect {status} without a Location", upstream_status=status
                )
            return _Redirect(location)
        if 400 <= status < 500:
            raise MediaFetchError.bad_request(
                f"media server answered {status}", upstream_status=status
            )
        if not 200 <= status < 300:
            raise MediaFetchError.bad_gateway(
                f"media server answered {status}", upstream_status=status
            )
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # We asked for identity; decoding gzip/br would let a small body expand past
            # the cap inside one chunk, so compressed answers are refused.
            raise MediaFetchError.bad_gateway(
                f"media server sent Content-Encoding {encoding[:32]!r}; only identity is accepted"
            )
        check_content_length(response.headers.get("content-length"), max_bytes)
        return await read_capped(response.aiter_raw(), max_bytes)
