"""Decoding ``data:`` URLs (RFC 2397): base64 or percent-encoded payloads."""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import unquote_to_bytes

from gateway.media.config import MediaKind
from gateway.media.errors import MediaFetchError

_WHITESPACE = re.compile(rb"[ \t\r\n\f\v]+")
# Clients send URL-safe base64 too; fold it into the standard alphabet.
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def max_encoded_chars(max_bytes: int, *, is_base64: bool) -> int:
    """Longest payload text that could decode to at most ``max_bytes`` bytes.

    Checked before decoding so an oversize URL costs no decode work or memory. Base64 gets
    some slack for the line breaks some encoders insert; percent-encoding takes at most
    three characters per byte.
    """
    if is_base64:
        exact = 4 * ((max_bytes + 2) // 3)
        return exact + exact // 64 + 4
    return 3 * max_bytes


def decode_data_url(url: str, kind: MediaKind, max_bytes: int) -> bytes:
    """Decode a ``data:`` URL whose media type is ``kind``/* into at most ``max_bytes``."""
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise MediaFetchError.bad_request("data URL has no ',' before its payload")
    params = [param.strip().lower() for param in header.split(";")]
    media_type = params[0]
    if not (media_type.startswith(f"{kind}/") and len(media_type) > len(kind) + 1):
        shown = media_type or "text/plain (the default)"
        raise MediaFetchError.bad_request(
            f"data URL media type {shown[:64]!r} is not an {kind}/* type"
        )
    is_base64 = "base64" in params[1:]
    limit = max_encoded_chars(max_bytes, is_base64=is_base64)
    if len(payload) > limit:
        raise MediaFetchError.bad_request(
            f"data URL payload has {len(payload)} characters, more than the {limit} that "
            f"a {max_bytes}-byte {kind} can take"
        )
    try:
        raw = unquote_to_bytes(payload)
    except UnicodeEncodeError as exc:  # lone surrogates cannot be encoded as UTF-8
        raise MediaFetchError.bad_request("data URL payload is not valid text") from exc
    data = _decode_base64(raw) if is_base64 else raw
    if len(data) > max_bytes:
        raise MediaFetchError.bad_request(
            f"data URL {kind} is {len(data)} bytes, more than the {max_bytes}-byte limit"
        )
    return data


def _decode_base64(raw: bytes) -> bytes:
    """Strict base64 decode that forgives whitespace, URL-safe letters and missing padding."""
    text = _WHITESPACE.sub(b"", raw).translate(_URLSAFE_TO_STANDARD).rstrip(b"=")
    text += b"=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaFetchError.bad_request(f"data URL payload is not valid base64: {exc}") from exc
