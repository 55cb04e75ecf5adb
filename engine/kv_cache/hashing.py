"""Prefix-cache keys: a chained sha256 per full block of tokens.

A block's hash covers its parent's hash, its token ids and its *extra keys* (content
hashes of the media overlapping the block, plus the cache salt in the first block), so
equal hashes mean equal KV for the whole prefix. The encoding is canonical and
type-tagged, never Python ``hash()``: hashes are compared across processes (prefill vs
decode) and runs, where ``PYTHONHASHSEED`` differs.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from engine.kv_cache.request import MediaSpan

ExtraKey = str | bytes | int | tuple["ExtraKey", ...]

_DOMAIN = b"tandem.kv_block.v1"
_NO_PARENT = b"\x00"
_HAS_PARENT = b"\x01"


def hash_block(
    parent_hash: bytes | None, token_ids: Sequence[int], extra_keys: tuple[ExtraKey, ...] = ()
) -> bytes:
    """Return the 32-byte sha256 key of one full block, chained over ``parent_hash``."""
    digest = hashlib.sha256(_DOMAIN)
    if parent_hash is None:
        digest.update(_NO_PARENT)
    else:
        digest.update(_HAS_PARENT + struct.pack("<I", len(parent_hash)) + parent_hash)
    digest.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    encoded = bytearray()
    _encode_key(extra_keys, encoded)
    digest.update(encoded)
    return digest.digest()


def _encode_key(key: ExtraKey, out: bytearray) -> None:
    # Tag + length prefix keeps the encoding injective: ("ab",) != ("a", "b").
    if isinstance(key, str):
        data = key.encode("utf-8")
        out += b"s" + struct.pack("<I", len(data)) + data
    elif isinstance(key, bytes):
        out += b"b" + struct.pack("<I", len(key)) + key
    elif isinstance(key, int):
        out += b"i" + struct.pack("<q", int(key))
    elif isinstance(key, tuple):
        out += b"t" + struct.pack("<I", len(key))
        for item in key:
            _encode_key(item, out)
    else:
        raise TypeError(f"unsupported extra key type {type(key).__name__}")


def block_extra_keys(
    start: int, end: int, media_spans: Sequence[MediaSpan], cache_salt: str | None = None
) -> tuple[ExtraKey, ...]:
    """Extra keys of the block covering token positions ``[start, end)``.

    The content hash of every media span overlapping the range, in prompt order, preceded
    in the first block by ``("salt", cache_salt)`` when a salt is set. Placeholder layout
    inside a block is already fixed by the token ids (media are bracketed by start/end
    tokens), so the content hashes alone tell two images apart.
    """
    keys: list[ExtraKey] = []
    if start == 0 and cache_salt is not None:
        keys.append(("salt", cache_salt))
    for span in sorted(media_spans):
        if span.offset < end and span.offset + span.length > start:
            keys.append(span.content_hash)
    return tuple(keys)


def extend_block_hashes(
    block_hashes: list[bytes],
    token_ids: Sequence[int],
    block_size: int,
    media_spans: Sequence[MediaSpan] = (),
    cache_salt: str | None = None,
) -> None:
    """Append to ``block_hashes`` the keys of full blocks of ``token_ids`` not hashed yet.

    ``block_hashes`` must hold the chain of the leading blocks of the same token ids, so
    a growing request is hashed incrementally.
    """
    spans = [MediaSpan(*span) for span in media_spans]
    parent = block_hashes[-1] if block_hashes else None
    for index in range(len(block_hashes), len(token_ids) // block_size):
        start, end = index * block_size, (index + 1) * block_size
        extra = block_extra_keys(start, end, spans, cache_salt)
        parent = hash_block(parent, token_ids[start:end], extra)
        block_hashes.append(parent)
