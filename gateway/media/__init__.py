"""Safe fetching of the images and videos named in chat requests.

``MediaFetcher(MediaFetchConfig(...)).fetch(url, "image")`` returns bytes or raises
``MediaFetchError`` (``.status`` 400, 502 or 504; see ``errors``).
"""

from __future__ import annotations

from gateway.media.address import (
    HostAllowList,
    IPAddress,
    Resolver,
    is_forbidden_address,
    resolve_host,
)
from gateway.media.config import MediaFetchConfig, MediaKind, parse_allow_hosts
from gateway.media.errors import MediaFetchError
from gateway.media.fetcher import MediaFetcher

__all__ = [
    "HostAllowList",
    "IPAddress",
    "MediaFetchConfig",
    "MediaFetchError",
    "MediaFetcher",
    "MediaKind",
    "Resolver",
    "is_forbidden_address",
    "parse_allow_hosts",
    "resolve_host",
]
