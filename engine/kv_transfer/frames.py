"""Wire format of KV transfer messages: a tagged msgspec header plus raw tensor buffers.

A message is a list of frames. Frame 0 is one tag byte followed by the msgpack encoding of
the header struct the tag names; a LAYER message then carries two more frames, the K and V
payloads of its blocks as raw little-endian bytes (C-contiguous `[n, block_size, H_kv, D]`).
Nothing is pickled, and decoding a header validates every field's type, so a malformed or
hostile message raises `FrameError` instead of reaching the cache.
"""

from __future__ import annotations

from typing import Any

import msgspec
import torch

TAG_LAYER = 1
TAG_FINISH = 2
TAG_ABORT = 3

# The dtypes a KV cache may have; names travel on the wire (no getattr on torch).
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class FrameError(ValueError):
    """A message that does not parse; the receiver drops and counts it."""


class LayerHeader(msgspec.Struct, frozen=True):
    """One layer's K and V for `block_ids` (decode's ids), followed by two payload frames."""

    request_id: str
    token: bytes
    layer: int
    block_ids: list[int]
    dtype: str
    block_shape: list[int]  # [block_size, H_kv, D]


class FinishHeader(msgspec.Struct, frozen=True):
    """The last message of a transfer: prefill's first sampled token."""

    request_id: str
    token: bytes
    first_token_id: int
    extra: dict[str, Any] = {}


class AbortHeader(msgspec.Struct, frozen=True):
    """Prefill gave up on the request; decode fails it at once instead of timing out."""

    request_id: str
    token: bytes
    reason: str = ""


Header = LayerHeader | FinishHeader | AbortHeader

_ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict[int, msgspec.msgpack.Decoder[Any]] = {
    TAG_LAYER: msgspec.msgpack.Decoder(LayerHeader),
    TAG_FINISH: msgspec.msgpack.Decoder(FinishHeader),
    TAG_ABORT: msgspec.msgpack.Decoder(AbortHeader),
}
_TAGS: dict[type, int] = {LayerHeader: TAG_LAYER, FinishHeader: TAG_FINISH, AbortHeader: TAG_ABORT}


def encode_header(header: Header) -> bytes:
    return bytes([_TAGS[type(header)]]) + _ENCODER.encode(header)


def decode_header(frame: bytes | memoryview) -> Header:
    """Parse frame 0; raise `FrameError` on an unknown tag or a malformed body."""
    view = memoryview(frame)
    if len(view) < 2:
        raise FrameError("header frame too short")
    decoder = _DECODERS.get(view[0])
    if decoder is None:
        raise FrameError(f"unknown tag {view[0]}")
    try:
        return decoder.decode(view[1:])
    except msgspec.MsgspecError as e:
        raise FrameError(f"bad header: {e}") from e


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """Zero-copy bytes of a contiguous CPU tensor (the view keeps the tensor alive)."""
    assert t.device.type == "cpu" and t.is_contiguous(), (t.device, t.stride())
    return t.view(torch.uint8).reshape(-1).numpy().data


def buffer_tensor(buf: bytes | memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor over `buf` (zero-copy when writable); raise `FrameError` on a size mismatch."""
    view = memoryview(buf).cast("B")
    expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if view.nbytes != expected:
        raise FrameError(f"payload of {view.nbytes} bytes, expected {expected}")
    if view.readonly:
        view = memoryview(bytearray(view))  # torch.frombuffer wants a writable buffer
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(view, dtype=torch.uint8).view(dtype).view(shape)


def block_rows(t: torch.Tensor) -> torch.Tensor:
    """`[num_blocks, ...]` viewed as one row of raw words per block, for gathers/scatters.

    Copying blocks as rows of int64 (the bytes, reinterpreted) is several times faster on
    CPU than `index_select` / `index_copy_` over bf16 `[n, block_size, H, D]` tensors.
    """
    rows = t.reshape(t.shape[0], -1).view(torch.uint8)
    return rows.view(torch.int64) if rows.shape[1] % 8 == 0 else rows


def read_blocks(kv_caches: Any, layer: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh copies of K and V of blocks `ids` (in that order) of layer `layer`.

    `kv_caches`: a list of `(k, v)` cache tensors, or an object with its own `read_blocks`
    (tensor-parallel rank 0 serves whole-head blocks gathered from every rank)."""
    reader = getattr(kv_caches, "read_blocks", None)
    if reader is not None:
        return reader(layer, ids)
    k_cache, v_cache = kv_caches[layer]
    idx = torch.tensor(ids, dtype=torch.long, device=k_cache.device)
    return block_rows(k_cache).index_select(0, idx), block_rows(v_cache).index_select(0, idx)


def write_blocks(
    kv_caches: Any, layer: int, ids: list[int], k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write K and V `[n, block_size, H_kv, D]` into blocks `ids` of layer `layer` (or hand
    them to the object's own `write_blocks`: tensor-parallel rank 0 stages them for every
    rank's slice of heads)."""
    writer = getattr(kv_caches, "write_blocks", None)
    if writer is not None:
        writer(layer, ids, k, v)
        return
    k_cache, v_cache = kv_caches[layer]
    idx = torch.tensor(ids, dtype=torch.long, device=k_cache.device)
    block_rows(k_cache).index_copy_(0, idx, block_rows(k.to(k_cache.device)))
    block_rows(v_cache).index_copy_(0, idx, block_rows(v.to(v_cache.device)))


def layer_message(header: LayerHeader, k: torch.Tensor, v: torch.Tensor) -> list[Any]:
    return [encode_header(header), tensor_buffer(k), tensor_buffer(v)]


def payload_bytes(message: list[Any]) -> int:
    """KV payload bytes of a message (frames after the header)."""
    return sum(memoryview(f).nbytes for f in message[1:])
