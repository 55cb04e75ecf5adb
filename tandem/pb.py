"""Protobuf ↔ plain Python for the engine services (torch-free: the gateway uses it too).

Tensors travel as raw little-endian bytes with dtype and shape (never pickle); the
torch side of that lives in `tensor_to_torch` / `torch_to_tensor`, imported lazily.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tandem.v1 import common_pb2

if TYPE_CHECKING:
    import torch

KINDS = {common_pb2.MEDIA_KIND_IMAGE: "image", common_pb2.MEDIA_KIND_VIDEO: "video"}
KIND_IDS = {v: k for k, v in KINDS.items()}

FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}
FINISH_NAMES = {v: k for k, v in FINISH_REASONS.items()}

_OPTIONAL = ("temperature", "top_p", "repetition_penalty", "max_tokens", "logprobs", "seed")


def sampling_to_pb(values: Mapping[str, Any]) -> common_pb2.SamplingParams:
    """Engine-vocabulary sampling knobs (a dict of SamplingParams fields) → pb."""
    pb = common_pb2.SamplingParams()
    for name, value in values.items():
        if value is None or name == "n":
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(pb, name).extend(value)
        elif name == "seed":
            pb.seed = int(value) % 2**64
        else:
            setattr(pb, name, value)
    return pb


def sampling_from_pb(pb: common_pb2.SamplingParams) -> dict[str, Any]:
    """pb → keyword arguments of engine `SamplingParams` (validated there)."""
    out: dict[str, Any] = {
        "top_k": pb.top_k,
        "min_p": pb.min_p,
        "presence_penalty": pb.presence_penalty,
        "frequency_penalty": pb.frequency_penalty,
        "min_tokens": pb.min_tokens,
        "stop": tuple(pb.stop),
        "stop_token_ids": tuple(pb.stop_token_ids),
        "ignore_eos": pb.ignore_eos,
        "include_stop_str_in_output": pb.include_stop_str_in_output,
        "max_tokens": pb.max_tokens if pb.HasField("max_tokens") else None,
        "logprobs": pb.logprobs if pb.HasField("logprobs") else None,
        "seed": pb.seed if pb.HasField("seed") else None,
        "reasoning_max_tokens": (
            pb.reasoning_max_tokens if pb.HasField("reasoning_max_tokens") else None
        ),
        "skip_special_tokens": (
            pb.skip_special_tokens if pb.HasField("skip_special_tokens") else True
        ),
    }
    for name in ("temperature", "top_p", "repetition_penalty"):
        if pb.HasField(name):
            out[name] = getattr(pb, name)
    return out


def logprobs_to_pb(entries: Sequence[Mapping[int, float]] | None) -> list[common_pb2.Logprobs]:
    return [
        common_pb2.Logprobs(
            entries=[common_pb2.TokenLogprob(token_id=k, logprob=v) for k, v in d.items()]
        )
        for d in entries or ()
    ]


def logprobs_from_pb(pbs: Sequence[common_pb2.Logprobs]) -> list[dict[int, float]] | None:
    if not pbs:
        return None
    return [{e.token_id: e.logprob for e in lp.entries} for lp in pbs]


def numpy_to_tensor(array: np.ndarray) -> common_pb2.Tensor:
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return common_pb2.Tensor(dtype=array.dtype.name, shape=list(array.shape), data=array.tobytes())


def tensor_to_torch(pb: common_pb2.Tensor) -> torch.Tensor:
    import torch

    dtype = getattr(torch, pb.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {pb.dtype!r}")
    flat = (
        torch.frombuffer(bytearray(pb.data), dtype=dtype)
        if pb.data
        else torch.empty(0, dtype=dtype)
    )
    numel = int(np.prod(pb.shape)) if pb.shape else 0
    if flat.numel() != numel:
        raise ValueError(
            f"tensor bytes give {flat.numel()} values, shape {list(pb.shape)} needs {numel}"
        )
    return flat.reshape(list(pb.shape))


def torch_to_tensor(t: torch.Tensor) -> common_pb2.Tensor:
    import torch

    t = t.detach().contiguous().cpu()
    dtype = str(t.dtype).removeprefix("torch.")
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return common_pb2.Tensor(dtype=dtype, shape=list(t.shape), data=data)
