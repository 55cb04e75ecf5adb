"""The tensor-parallel control channel's messages: msgpack headers plus raw tensor bytes.

Rank 0 sends each worker its start-up spec, then one `Step` per engine step and finally a
`Stop`; a worker answers once with a `Status`. As on every socket of the project (ARCHITECTURE
§3), nothing is pickled: a frame is `u32 header length | msgpack header | tensor bytes`, the
header naming each tensor's dtype, shape and offset in the tail.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import torch

from engine.model_runner import MediaSlice, StepSequence

_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool")
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_LEN = struct.Struct("<I")


class WireError(ValueError):
    """A control frame that does not decode."""


class TensorRef(msgspec.Struct, array_like=True):
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int


class WireMedia(msgspec.Struct, array_like=True):
    start: int
    embeds: TensorRef


class WireSeq(msgspec.Struct, array_like=True):
    token_ids: list[int]
    positions: TensorRef | None
    num_computed: int
    block_ids: list[int]
    media: list[WireMedia]
    vision_rows: TensorRef | None
    logits: str
    text_position: int


class WireImport(msgspec.Struct, array_like=True):
    layer: int
    block_ids: list[int]
    k: TensorRef
    v: TensorRef


class Step(msgspec.Struct, tag="step", array_like=True):
    seqs: list[WireSeq]
    hook: bool
    export_blocks: list[int]
    imports: list[WireImport]


class Stop(msgspec.Struct, tag="stop", array_like=True):
    pass


class Spec(msgspec.Struct, tag="spec", array_like=True):
    args: dict[str, Any]  # `EngineArgs` fields
    num_blocks: int
    rank: int
    size: int
    store_port: int
    device: str


class Status(msgspec.Struct, tag="status", array_like=True):
    ok: bool
    detail: str = ""


Message = Step | Stop | Spec | Status
_DECODER = msgspec.msgpack.Decoder(Message)


class _Tail:
    """Collects the tensors of one frame."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, t: torch.Tensor) -> TensorRef:
        if t.dtype not in _NAMES:
            raise WireError(f"no wire dtype for {t.dtype}")
        t = t.detach().to("cpu").contiguous()
        data = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        ref = TensorRef(_NAMES[t.dtype], list(t.shape), self.size, len(data))
        self.parts.append(data)
        self.size += len(data)
        return ref


def encode(msg: Message, tail: _Tail | None = None) -> bytes:
    header = msgspec.msgpack.encode(msg)
    return b"".join([_LEN.pack(len(header)), header, *(tail.parts if tail else [])])


def encode_step(
    seqs: list[StepSequence],
    hook: bool,
    export_blocks: list[int],
    imports: list[tuple[int, list[int], torch.Tensor, torch.Tensor]],
) -> bytes:
    tail = _Tail()
    wire = [
        WireSeq(
            token_ids=list(s.token_ids),
            positions=None if s.positions is None else tail.add(s.positions),
            num_computed=s.num_computed,
            block_ids=list(s.block_ids),
            media=[WireMedia(m.start, tail.add(m.embeds)) for m in s.media],
            vision_rows=None if s.vision_rows is None else tail.add(s.vision_rows),
            logits=s.logits,
            text_position=s.text_position,
        )
        for s in seqs
    ]
    wire_imports = [
        WireImport(layer, list(ids), tail.add(k), tail.add(v)) for layer, ids, k, v in imports
    ]
    return encode(Step(wire, hook, list(export_blocks), wire_imports), tail)


def decode(frame: bytes) -> tuple[Message, memoryview]:
    """(header, the frame's tensor bytes)."""
    view = memoryview(frame)
    if len(view) < _LEN.size:
        raise WireError("short frame")
    (n,) = _LEN.unpack_from(view)
    try:
        msg = _DECODER.decode(view[_LEN.size : _LEN.size + n])
    except msgspec.DecodeError as e:
        raise WireError(f"bad header: {e}") from e
    return msg, view[_LEN.size + n :]


def tensor(ref: TensorRef, tail: memoryview) -> torch.Tensor:
    dtype = _DTYPES.get(ref.dtype)
    if dtype is None or ref.offset < 0 or ref.offset + ref.nbytes > len(tail):
        raise WireError(f"bad tensor reference {ref}")
    if ref.nbytes == 0:
        return torch.empty(ref.shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(tail[ref.offset : ref.offset + ref.nbytes]), dtype=torch.uint8)
    return raw.view(dtype).reshape(ref.shape)


def step_parts(
    msg: Step, tail: memoryview
) -> tuple[list[StepSequence], list[tuple[int, list[int], torch.Tensor, torch.Tensor]]]:
    seqs = [
        StepSequence(
            token_ids=s.token_ids,
            positions=None if s.positions is None else tensor(s.positions, tail),
            num_computed=s.num_computed,
            block_ids=s.block_ids,
            media=[MediaSlice(m.start, tensor(m.embeds, tail)) for m in s.media],
            vision_rows=None if s.vision_rows is None else tensor(s.vision_rows, tail),
            logits=s.logits,
            text_position=s.text_position,
        )
        for s in msg.seqs
    ]
    imports = [(i.layer, i.block_ids, tensor(i.k, tail), tensor(i.v, tail)) for i in msg.imports]
    return seqs, imports
