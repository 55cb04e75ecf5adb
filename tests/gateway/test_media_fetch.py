"""Tests of gateway.media: the SSRF guard, redirects, caps, timeouts, data: and local files.

Every HTTP server here is an asyncio server on 127.0.0.1 started by the test itself; names
other than ``localhost`` go through a fake resolver, so no test sends a DNS query.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.media import (
    HostAllowList,
    IPAddress,
    MediaFetchConfig,
    MediaFetcher,
    MediaFetchError,
    is_forbidden_address,
    parse_allow_hosts,
)
from gateway.media.http_fetch import host_header, read_capped

T = TypeVar("T")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test scenario on a fresh event loop."""
    return asyncio.run(coro)


# ---------------------------------------------------------------- a raw HTTP test server


@dataclass
class Exchange:
    """One request the test server received, and the stream to answer it on."""

    path: str
    headers: dict[str, str]
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def respond(self, status: int = 200, body: bytes = PNG, extra: str = "") -> None:
        """A complete response with a truthful Content-Length unless ``extra`` says more."""
        length = "" if "content-length" in extra.lower() else f"Content-Length: {len(body)}\r\n"
        head = f"HTTP/1.1 {status} X\r\n{length}{extra}Connection: close\r\n\r\n"
        await self.send(head.encode() + body)


Handler = Callable[[Exchange], Awaitable[None]]


@dataclass
class Server:
    """Where a test server listens and what it was asked."""

    port: int = 0
    requests: list[Exchange] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    @property
    def paths(self) -> list[str]:
        return [exchange.path for exchange in self.requests]


async def serve_png(exchange: Exchange) -> None:
    await exchange.respond()


def redirect_to(location: str, status: int = 302) -> Handler:
    async def handler(exchange: Exchange) -> None:
        await exchange.respond(status, b"", f"Location: {location}\r\n")

    return handler


@asynccontextmanager
async def serve(
    routes: Mapping[str, Handler], ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Server]:
    """Serve ``routes`` (path → handler) on 127.0.0.1; unknown paths get 404."""
    state = Server()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            lines = [line.split(":", 1) for line in head[1:] if ":" in line]
            headers = {name.strip().lower(): value.strip() for name, value in lines}
            exchange = Exchange(head[0].split(" ")[1], headers, writer)
            state.requests.append(exchange)
            handler = routes.get(exchange.path)
            await (handler(exchange) if handler else exchange.respond(404, b"no"))
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client hung up, which is what several tests make it do
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=ssl_context)
    state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield state


# ---------------------------------------------------------------- fetcher helpers


class FakeResolver:
    """Resolves only the names it was given; counts lookups."""

    def __init__(self, names: dict[str, str] | None = None, delay_s: float = 0.0) -> None:
        self.names = names or {}
        self.delay_s = delay_s
        self.num_lookups = 0

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.num_lookups += 1
        await asyncio.sleep(self.delay_s)
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "unknown name")
        return [ipaddress.ip_address(ip) for ip in self.names[host].split(",")]


async def numeric_only(host: str, port: int) -> list[IPAddress]:
    """getaddrinfo without DNS: parses every numeric spelling libc accepts."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, flags=socket.AI_NUMERICHOST)
    return [ipaddress.ip_address(info[4][0]) for info in infos]


def make_fetcher(resolver: Any = None, **config: Any) -> MediaFetcher:
    """A fetcher with test-sized timeouts; numeric resolution unless told otherwise."""
    defaults: dict[str, Any] = dict(connect_timeout_s=2.0, read_timeout_s=2.0, total_timeout_s=5.0)
    defaults.update(config)
    if "allow_hosts" in defaults:
        defaults["allow_hosts"] = frozenset(defaults["allow_hosts"])
    return MediaFetcher(MediaFetchConfig(**defaults), resolver=resolver or numeric_only)


def fetch_error(fetcher: MediaFetcher, url: str, kind: Any = "image") -> MediaFetchError:
    """Run a fetch that must fail and return its error."""
    with pytest.raises(MediaFetchError) as info:
        run(fetcher.fetch(url, kind))
    return info.value


# ---------------------------------------------------------------- the private-address guard


@pytest.mark.parametrize(
    "ip",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
     "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.1", "192.0.2.1", "198.18.0.1",
     "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
     "2002:7f00:1::", "64:ff9b::a9fe:a9fe", "2001:db8::1"],
)  # fmt: skip
def test_non_public_addresses_are_forbidden(ip: str) -> None:
    assert is_forbidden_address(ipaddress.ip_address(ip))


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(ip: str) -> None:
    assert not is_forbidden_address(ipaddress.ip_address(ip))


def test_allow_list_matches_names_and_networks() -> None:
    allow = HostAllowList.parse(["Media.Test.", "10.0.0.0/8", "::1"])
    assert allow.allows("media.test", ipaddress.ip_address("127.0.0.1"))
    assert allow.allows("x", ipaddress.ip_address("10.9.9.9"))
    assert allow.allows("x", ipaddress.ip_address("::ffff:10.0.0.1"))
    assert not allow.allows("media.test.evil", ipaddress.ip_address("127.0.0.1"))
    assert parse_allow_hosts("a.test, 10.0.0.0/8 ::1") == {"a.test", "10.0.0.0/8", "::1"}
    with pytest.raises(ValueError):
        parse_allow_hosts("bad host!")


def test_loopback_refused_by_default_and_served_when_allow_listed() -> None:
    async def scenario() -> None:
        async with serve({"/img": serve_png}) as server:
            with pytest.raises(MediaFetchError) as info:
                await make_fetcher().fetch(server.url("/img"), "image")
            assert info.value.status == 400 and "not a public" in info.value.reason
            assert server.requests == []  # refused before any connection
            for allowed in ("127.0.0.1", "127.0.0.0/8"):
                fetcher = make_fetcher(allow_hosts={allowed})
                assert await fetcher.fetch(server.url("/img"), "image") == PNG

    run(scenario())


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f.1", "127.1", "0177.0.0.1", "[::ffff:127.0.0.1]", "[::1]", "0"]
)
def test_other_spellings_of_private_addresses_refused(host: str) -> None:
    error = fetch_error(make_fetcher(), f"http://{host}:9/img")
    # httpx itself rejects some spellings (octal); the rest resolve to loopback and are refused
    assert error.status == 400
    assert "not a public" in error.reason or "malformed URL" in error.reason


def test_name_is_resolved_once_and_connection_pinned_to_checked_ip() -> None:
    async def scenario() -> None:
        resolver = FakeResolver({"media.test": "127.0.0.1"})
        fetcher = make_fetcher(resolver, allow_hosts={"media.test"})
        async with serve({"/img": serve_png}) as server:
            assert await fetcher.fetch(server.url("/img", "media.test"), "image") == PNG
            assert resolver.num_lookups == 1  # httpx never looked the name up again
            assert server.requests[0].headers["host"] == f"media.test:{server.port}"

    run(scenario())


def test_a_name_with_any_private_record_is_refused_outright() -> None:
    # the public record is never contacted: the hop is refused before any connection
    fetcher = make_fetcher(FakeResolver({"mixed.test": "8.8.8.8,10.0.0.1"}))
    error = fetch_error(fetcher, "http://mixed.test/img")
    assert error.status == 400 and "10.0.0.1" in error.reason


def test_host_header_keeps_the_original_name_and_port() -> None:
    assert host_header(httpx.URL("http://[::1]:8080/x")) == "[::1]:8080"
    assert host_header(httpx.URL("https://Media.Test:443/x")) == "media.test"
    assert host_header(httpx.URL("http://例え.jp/")) == "xn--r8jz45g.jp"


def test_https_pins_ip_but_verifies_the_certificate_for_the_name() -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("media.test").configure_cert(server_ctx)
    sni_seen: list[str | None] = []
    server_ctx.sni_callback = lambda _sock, name, _ctx: sni_seen.append(name)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    resolver = FakeResolver({"media.test": "127.0.0.1", "other.test": "127.0.0.1"})
    fetcher = MediaFetcher(
        MediaFetchConfig(allow_hosts=frozenset({"127.0.0.1"})),
        resolver=resolver,
        ssl_context=client_ctx,
    )

    async def scenario() -> None:
        async with serve({"/img": serve_png}, ssl_context=server_ctx) as server:
            url = f"https://media.test:{server.port}/img"
            assert await fetcher.fetch(url, "image") == PNG
            assert sni_seen == ["media.test"]
            with pytest.raises(MediaFetchError) as info:  # certificate is not for other.test
                await fetcher.fetch(f"https://other.test:{server.port}/img", "image")
            assert info.value.status == 502

    run(scenario())


# ---------------------------------------------------------------- redirects


@pytest.mark.parametrize("target_host", ["127.0.0.2", "127.0.0.1"])
def test_redirect_from_allowed_name_to_loopback_refused(target_host: str) -> None:
    async def scenario() -> None:
        async with serve({"/img": serve_png}) as server:
            routes_target = f"http://{target_host}:{server.port}/img"
            async with serve({"/start": redirect_to(routes_target)}) as first:
                # real resolver: "localhost" comes from /etc/hosts, never from DNS
                fetcher = MediaFetcher(MediaFetchConfig(allow_hosts=frozenset({"localhost"})))
                with pytest.raises(MediaFetchError) as info:
                    await fetcher.fetch(first.url("/start", "localhost"), "image")
                assert info.value.status == 400 and target_host in info.value.reason
                assert first.paths == ["/start"] and server.paths == []

    run(scenario())


@pytest.mark.parametrize(
    "location", ["http://evil.test:{port}/img", "file:///etc/passwd", "data:image/png,x"]
)
def test_redirect_targets_are_checked_like_the_first_url(location: str) -> None:
    async def scenario() -> None:
        resolver = FakeResolver({"media.test": "127.0.0.1", "evil.test": "127.0.0.1"})
        fetcher = make_fetcher(resolver, allow_hosts={"media.test"})
        async with serve({}) as server:
            target = location.format(port=server.port)
            async with serve({"/start": redirect_to(target)}) as first:
                with pytest.raises(MediaFetchError) as info:
                    await fetcher.fetch(first.url("/start", "media.test"), "image")
                assert info.value.status == 400 and server.requests == []

    run(scenario())


def test_redirect_chain_up_to_the_limit_is_followed_and_one_more_refused() -> None:
    async def scenario() -> None:
        routes = {"/r3": redirect_to("/r2", 301), "/r2": redirect_to("/r1", 307),
                  "/r1": redirect_to("/img", 308), "/img": serve_png,
                  "/loop": redirect_to("/loop")}  # fmt: skip
        fetcher = make_fetcher(FakeResolver({"m.test": "127.0.0.1"}), allow_hosts={"m.test"})
        async with serve(routes) as server:
            assert await fetcher.fetch(server.url("/r3", "m.test"), "image") == PNG
            assert server.requests[-1].headers["host"] == f"m.test:{server.port}"
            with pytest.raises(MediaFetchError) as info:
                await fetcher.fetch(server.url("/loop", "m.test"), "image")
            assert info.value.status == 400 and "too many redirects" in info.value.reason
            assert server.paths.count("/loop") == 4  # the first request + 3 redirects

    run(scenario())


# ---------------------------------------------------------------- size caps and bodies


async def endless_body(exchange: Exchange) -> None:
    await exchange.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    while True:  # no Content-Length: the body ends when the client gives up
        await exchange.send(b"x" * 65536)


async def endless_chunked(exchange: Exchange) -> None:
    await exchange.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    while True:
        await exchange.send(b"2000\r\n" + b"y" * 0x2000 + b"\r\n")


async def huge_content_length(exchange: Exchange) -> None:
    await exchange.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
    await asyncio.sleep(30)


async def short_body(exchange: Exchange) -> None:
    await exchange.send(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n" + b"z" * 10)


async def long_body(exchange: Exchange) -> None:
    await exchange.respond(200, b"w" * 1_000_000, "Content-Length: 10\r\n")


@pytest.mark.parametrize("path", ["/endless", "/chunked", "/declared"])
def test_oversize_body_refused_at_the_cap(path: str) -> None:
    routes = {"/endless": endless_body, "/chunked": endless_chunked}
    routes["/declared"] = huge_content_length

    async def scenario() -> None:
        fetcher = make_fetcher(allow_hosts={"127.0.0.1"}, max_image_bytes=100_000)
        async with serve(routes) as server:
            started = time.monotonic()
            with pytest.raises(MediaFetchError) as info:
                await fetcher.fetch(server.url(path), "image")
            assert info.value.status == 400 and "100000-byte limit" in info.value.reason
            assert time.monotonic() - started < 1.5  # refused at once, no timeout involved

    run(scenario())


def test_read_capped_reads_at_most_one_chunk_past_the_cap() -> None:
    num_pulled = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal num_pulled
        for _ in range(1000):
            num_pulled += 1
            yield b"c" * 1000

    with pytest.raises(MediaFetchError):
        run(read_capped(chunks(), 10_500))
    assert num_pulled == 11
    assert run(read_capped(chunks(), 10**6)) == b"c" * 1_000_000


def test_lying_content_length() -> None:
    async def scenario() -> None:
        fetcher = make_fetcher(allow_hosts={"127.0.0.1"}, max_image_bytes=100_000)
        async with serve({"/short": short_body, "/long": long_body}) as server:
            with pytest.raises(MediaFetchError) as info:  # promised 500, sent 10, hung up
                await fetcher.fetch(server.url("/short"), "image")
            assert info.value.status == 502
            # promised 10, sent 1 MB: only the 10 announced bytes are ever taken
            assert await fetcher.fetch(server.url("/long"), "image") == b"w" * 10

    run(scenario())


# ---------------------------------------------------------------- upstream failures and timeouts


async def silent(exchange: Exchange) -> None:
    await asyncio.sleep(30)


async def trickle(exchange: Exchange) -> None:
    await exchange.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    while True:
        await exchange.send(b"t")
        await asyncio.sleep(0.05)


def test_slow_servers_time_out_with_504() -> None:
    async def scenario() -> None:
        async with serve({"/silent": silent, "/trickle": trickle}) as server:
            cases = [("/silent", dict(read_timeout_s=0.3)), ("/trickle", dict(total_timeout_s=0.5))]
            for path, limits in cases:
                fetcher = make_fetcher(allow_hosts={"127.0.0.1"}, **limits)
                started = time.monotonic()
                with pytest.raises(MediaFetchError) as info:
                    await fetcher.fetch(server.url(path), "video")
                assert info.value.status == 504
                assert time.monotonic() - started < 1.5
        slow_dns = make_fetcher(FakeResolver({"a.test": "8.8.8.8"}, 5.0), connect_timeout_s=0.2)
        with pytest.raises(MediaFetchError) as info:
            await slow_dns.fetch("http://a.test/x", "image")
        assert info.value.status == 504

    run(scenario())


def answer(status: int, body: bytes = b"oops", extra: str = "") -> Handler:
    async def handler(exchange: Exchange) -> None:
        await exchange.respond(status, body, extra)

    return handler


def test_upstream_statuses_map_to_400_or_502() -> None:
    async def scenario() -> None:
        routes = {"/500": answer(500), "/gzip": answer(200, extra="Content-Encoding: gzip\r\n"),
                  "/nolocation": answer(302), "/empty": answer(200, b"")}  # fmt: skip
        fetcher = make_fetcher(allow_hosts={"127.0.0.1"})
        async with serve(routes) as server:
            expected = {"/missing": (400, 404), "/500": (502, 500), "/gzip": (502, None),
                        "/nolocation": (502, 302), "/empty": (400, None)}  # fmt: skip
            for path, (status, upstream) in expected.items():
                with pytest.raises(MediaFetchError) as info:
                    await fetcher.fetch(server.url(path), "image")
                assert (info.value.status, info.value.upstream_status) == (status, upstream), path
        with pytest.raises(MediaFetchError) as info:  # nothing listens there any more
            await fetcher.fetch(server.url("/img"), "image")
        assert info.value.status == 502

    run(scenario())


# ---------------------------------------------------------------- data: URLs


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"data:image/png;base64,{b64(PNG)}", PNG),
        (f"DATA:Image/PNG;BASE64,{b64(PNG)}", PNG),
        (f"data:image/jpeg;name=a.jpg;base64,{b64(PNG)[:40]}\n{b64(PNG)[40:]}", PNG),
        (f"data:image/png;base64,{base64.urlsafe_b64encode(PNG).decode().rstrip('=')}", PNG),
        (f"data:image/png;base64,{quote(b64(PNG), safe='')}", PNG),
        ("data:image/svg+xml,%3Csvg%2F%3E", b"<svg/>"),
    ],
)
def test_good_data_urls(url: str, expected: bytes) -> None:
    assert run(make_fetcher().fetch(url, "image")) == expected


def test_data_url_video_type() -> None:
    assert run(make_fetcher().fetch(f"data:video/mp4;base64,{b64(PNG)}", "video")) == PNG


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (f"data:text/plain;base64,{b64(PNG)}", "not an image/*"),
        (f"data:video/mp4;base64,{b64(PNG)}", "not an image/*"),
        (f"data:;base64,{b64(PNG)}", "not an image/*"),
        ("data:image/;base64,AAAA", "not an image/*"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png;base64,AAAAA", "not valid base64"),
        ("data:image/png;base64" + b64(PNG), "no ','"),
        ("data:image/png;base64,", "empty"),
        (f"data:image/png;base64,{b64(bytes(101))}", "101 bytes, more than the 100-byte"),
        ("data:image/png," + "%41" * 50 + "A" * 51, "101 bytes, more than the 100-byte"),
        (f"data:image/png;base64,{'A' * 10_000}", "10000 characters"),
        ("data:image/png," + "B" * 301, "301 characters"),
    ],
)
def test_bad_data_urls(url: str, reason: str) -> None:
    error = fetch_error(make_fetcher(max_image_bytes=100), url)
    assert error.status == 400 and reason in error.reason


# ---------------------------------------------------------------- local files


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(PNG)
    (root / "sub" / "b c.png").write_bytes(PNG[::-1])
    (root / "big.png").write_bytes(bytes(1001))
    (tmp_path / "secret.txt").write_bytes(b"secret")
    (root / "escape").symlink_to(tmp_path / "secret.txt")
    (root / "escape_dir").symlink_to(tmp_path)
    (root / "alias.png").symlink_to(root / "a.png")
    os.mkfifo(root / "fifo")
    (tmp_path / "linked_root").symlink_to(root)
    return root


def test_local_files_inside_the_allowed_dir(media_dir: Path) -> None:
    fetcher = make_fetcher(allowed_local_media_path=media_dir, max_image_bytes=1000)
    urls = [f"file://{media_dir}/a.png", f"file://localhost{media_dir}/a.png"]
    urls += [str(media_dir / "a.png"), "a.png", "alias.png", f"  {media_dir}/a.png  "]
    for url in urls:
        assert run(fetcher.fetch(url, "image")) == PNG, url
    spaced = f"file://{quote(str(media_dir / 'sub' / 'b c.png'))}"
    assert run(fetcher.fetch(spaced, "image")) == PNG[::-1]
    via_link = make_fetcher(allowed_local_media_path=media_dir.parent / "linked_root")
    assert run(via_link.fetch(str(media_dir.parent / "linked_root" / "a.png"), "image")) == PNG


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("{root}/../secret.txt", "'..'"),
        ("../secret.txt", "'..'"),
        ("file://{root}/sub/../a.png", "'..'"),
        ("{root}/../../../etc/passwd", "'..'"),
        ("/etc/passwd", "outside the allowed"),
        ("file:///etc/hostname", "outside the allowed"),
        ("escape", "outside the allowed"),
        ("escape_dir/secret.txt", "outside the allowed"),
        ("{root}/missing.png", "not found"),
        ("sub", "not a regular file"),
        ("fifo", "not a regular file"),
        ("big.png", "1001 bytes, more than the 1000-byte"),
        ("file://otherhost{root}/a.png", "host"),
        ("file://{root}/a.png?x=1", "query"),
        ("file://{root}/%ff.png", "UTF-8"),
    ],
)
def test_local_files_refused(media_dir: Path, url: str, reason: str) -> None:
    fetcher = make_fetcher(allowed_local_media_path=media_dir, max_image_bytes=1000)
    error = fetch_error(fetcher, url.format(root=media_dir))
    assert error.status == 400 and reason in error.reason


def test_local_files_refused_when_flag_unset(media_dir: Path) -> None:
    error = fetch_error(make_fetcher(), str(media_dir / "a.png"))
    assert error.status == 400 and "not allowed" in error.reason


# ---------------------------------------------------------------- malformed input and config


@pytest.mark.parametrize(
    "url",
    ["", "   ", "http://", "http:///x", "http://[zz]/", "http://h:99999/", "ftp://x/y",
     "javascript:alert(1)", "gopher://x", "ws://x/", "http://user:pw@127.0.0.1/",
     "http://a b/", "\x00", "http://\x00/", "https://" + "a" * 10_000, "http://-/",
     "http://a..b/", "http://" + "a" * 70 + ".test/", "nope"],
)  # fmt: skip
def test_malformed_urls_refused(url: str) -> None:
    assert fetch_error(make_fetcher(FakeResolver()), url).status == 400


def test_scheme_allow_list() -> None:
    fetcher = make_fetcher(FakeResolver(), allowed_schemes=frozenset({"https"}))
    for url in ["http://a.test/", f"data:image/png;base64,{b64(PNG)}", "/tmp/a.png"]:
        assert "not allowed" in fetch_error(fetcher, url).reason


@pytest.mark.parametrize(
    "bad",
    [dict(max_image_bytes=0), dict(read_timeout_s=0.0), dict(max_redirects=-1),
     dict(allowed_schemes=frozenset({"ftp"})), dict(allow_hosts=frozenset({"a b"})),
     dict(allowed_local_media_path=Path("/nonexistent/media"))],
)  # fmt: skip
def test_config_is_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        MediaFetchConfig(**bad)


_PREFIXES = ["http://", "https://", "data:", "data:image/png;base64,", "file://", "file:///",
             "/", "", "http://[", "http://127.0.0.1:", "data:image/png,%"]  # fmt: skip


def test_random_strings_only_raise_media_fetch_error(media_dir: Path) -> None:
    fetcher = make_fetcher(FakeResolver(), allowed_local_media_path=media_dir)
    loop = asyncio.new_event_loop()  # one loop for all examples: a loop per example is slow
    text = st.text(alphabet=st.characters(exclude_categories=[]) | st.sampled_from("/.%:@[]"))

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.sampled_from(_PREFIXES), text)
    def check(prefix: str, rest: str) -> None:
        try:
            loop.run_until_complete(fetcher.fetch(prefix + rest, "image"))
        except MediaFetchError as error:
            assert error.status in (400, 502, 504) and error.reason

    try:
        check()
    finally:
        loop.close()
