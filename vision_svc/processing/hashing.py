"""Content hashes of media: the cache key of preprocessed pixels and vision embeddings.

The hash covers the raw input plus every option that changes the output, so the same bytes
processed with different options never share a cache entry. It uses sha256 over a canonical
encoding (sorted-key JSON, explicit dtype/shape for arrays), never Python's `hash()`, so every
process and every host computes the same value. Bump PROCESSOR_VERSION whenever the
preprocessing algorithm changes its output for the same input and options.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from vision_svc.processing.errors import InvalidMediaOptionsError

PROCESSOR_VERSION = 1
MEDIA_KINDS = ("image", "video")


def content_hash(
    data: bytes | np.ndarray, kind: str, processor_kwargs: Mapping[str, Any] | None = None
) -> str:
    """sha256 hex of (version, kind, options, data); stable across processes and hosts."""
    if kind not in MEDIA_KINDS:
        raise InvalidMediaOptionsError(f"kind must be one of {MEDIA_KINDS}, got {kind!r}")
    try:
        options = json.dumps(
            dict(processor_kwargs or {}), sort_keys=True, separators=(",", ":"), allow_nan=False
        )
    except (TypeError, ValueError) as e:
        raise InvalidMediaOptionsError(f"processor kwargs are not JSON-serialisable: {e}") from e
    h = hashlib.sha256()
    header = {"v": PROCESSOR_VERSION, "kind": kind, "options": options}
    if isinstance(data, np.ndarray):
        # dtype and shape are part of the identity: the same bytes as [2, 6] and [3, 4] differ.
        header["array"] = {"dtype": data.dtype.str, "shape": list(data.shape)}
        payload = np.ascontiguousarray(data).tobytes()
    elif isinstance(data, bytes | bytearray | memoryview):
        payload = bytes(data)
    else:
        raise InvalidMediaOptionsError(f"cannot hash media of type {type(data).__name__}")
    encoded_header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    # Length-prefix the header so no header/payload split can collide with another.
    h.update(len(encoded_header).to_bytes(8, "big"))
    h.update(encoded_header)
    h.update(payload)
    return h.hexdigest()
