"""Configuration of media fetching: one frozen dataclass, validated on construction."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gateway.media.address import HostAllowList

MediaKind = Literal["image", "video"]
"""What a content part carries; picks the size cap and the accepted ``data:`` media type."""

MIB = 1024 * 1024
SUPPORTED_SCHEMES = frozenset({"http", "https", "data", "file"})


@dataclass(frozen=True)
class MediaFetchConfig:
    """How the gateway may fetch the media named in a request."""

    allowed_local_media_path: Path | None = None
    """Folder whose files (``file://`` URLs and bare paths) may be read; None refuses all
    local files. Must be an existing directory."""

    allow_hosts: frozenset[str] = frozenset()
    """Host names, IPs and CIDRs exempt from the private-address guard
    (``--media-allow-hosts``). A name exempts whatever it resolves to, but only when the URL
    names it: an IP reached by another name or by a redirect is checked on its own."""

    max_image_bytes: int = 20 * MIB
    """Largest image accepted, counted on the decoded bytes."""

    max_video_bytes: int = 256 * MIB
    """Largest video accepted, counted on the decoded bytes."""

    connect_timeout_s: float = 5.0
    """Limit for resolving the host and opening a TCP (+TLS) connection, per hop."""

    read_timeout_s: float = 10.0
    """Longest silence allowed while reading one response."""

    total_timeout_s: float = 60.0
    """Deadline for the whole fetch, redirects included, so a trickling server cannot hold
    a request forever."""

    max_redirects: int = 3
    """Redirects followed before giving up; every hop is checked like the first URL."""

    allowed_schemes: frozenset[str] = field(default_factory=lambda: SUPPORTED_SCHEMES)
    """Subset of http, https, data, file; ``file`` also covers bare local paths."""

    def __post_init__(self) -> None:
        for name in ("max_image_bytes", "max_video_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        unknown = self.allowed_schemes - SUPPORTED_SCHEMES
        if unknown:
            raise ValueError(f"unsupported media schemes: {sorted(unknown)}")
        root = self.allowed_local_media_path
        if root is not None and not root.is_dir():
            raise ValueError(f"allowed_local_media_path {root} is not a directory")
        HostAllowList.parse(self.allow_hosts)  # raises ValueError on a bad entry

    def max_bytes(self, kind: MediaKind) -> int:
        """Size cap for one item of ``kind``."""
        return self.max_image_bytes if kind == "image" else self.max_video_bytes


def parse_allow_hosts(value: str) -> frozenset[str]:
    """Parse the ``--media-allow-hosts`` value: names, IPs or CIDRs split by commas/spaces."""
    entries = frozenset(entry for entry in re.split(r"[,\s]+", value) if entry)
    HostAllowList.parse(entries)
    return entries
