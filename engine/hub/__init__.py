"""Model resolution and download: `--model` (a directory or a hub id) → a local directory.

Hub ids download from AIStudio (default), Hugging Face or ModelScope over plain HTTP with
resume, size and sha256 checks; see `resolve.py` for the cache layout and `sources.py` for
the endpoint and token environment variables of each hub.
"""

from __future__ import annotations

from engine.hub.download import RemoteFile
from engine.hub.errors import (
    DownloadIntegrityError,
    HubConnectionError,
    InvalidModelError,
    ModelNotFoundError,
    ModelResolutionError,
)
from engine.hub.http import RetryPolicy
from engine.hub.resolve import ENV_CACHE_DIR, ENV_SOURCE, resolve_model
from engine.hub.sources import SOURCES, HubSource

__all__ = [
    "ENV_CACHE_DIR",
    "ENV_SOURCE",
    "SOURCES",
    "DownloadIntegrityError",
    "HubConnectionError",
    "HubSource",
    "InvalidModelError",
    "ModelNotFoundError",
    "ModelResolutionError",
    "RemoteFile",
    "RetryPolicy",
    "resolve_model",
]
