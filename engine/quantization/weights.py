"""Weight-only quantization of one weight tensor: symmetric integers plus float scales.

A weight `[..., N, K]` (N output channels, K input features; leading dims stack experts)
is cut along K into G groups of g = K / G features. Each (row, group) gets one scale
`s = absmax / qmax` and its values become `q = clamp(round(w / s), -qmax, qmax)`:

* wint8: qmax 127, one group per row (per-output-channel scales `[..., N, 1]`), q int8.
* wint4: qmax 7, groups of `group_size` along K (scales `[..., N, K/g]`), q in [-7, 7]
  stored as q + 8 in a nibble, two per uint8 byte: byte j of a row holds feature 2j in its
  low nibble and feature 2j + 1 in its high nibble (`[..., N, K/2]` uint8).

Rounding to nearest bounds the error of every weight by half a step: `|w - q s| <= s / 2`.
The scale is rounded to the dtype it will be stored in *before* the weights are divided by
it, so the bound holds for the stored scale, not just for an fp32 one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("wint8", "wint4")
QMAX = {"wint8": 127, "wint4": 7}
MIN_GROUP = 16
"""The finest wint4 group `group_for` falls back to."""
INT4_OFFSET = 8  # stored nibble = q + 8, so q in [-8, 7] fits 0..15


@dataclass(frozen=True)
class QuantConfig:
    """How weights are quantized."""

    method: str
    """"wint8" (per-output-channel int8) or "wint4" (group-wise int4)."""
    group_size: int = 128
    """wint4: input features per scale. A row shorter than this is one group; a row that is
    not a multiple of it uses the largest common divisor (at least `MIN_GROUP`): a
    tensor-parallel slice, e.g. the 424B model's 3584 expert features over 8 ranks = 448,
    gets groups of 64."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization {self.method!r}: expected one of {METHODS}")
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be an even number >= 2, got {self.group_size}")

    def group_for(self, in_features: int) -> int:
        """Features per scale for a weight with `in_features` columns."""
        if self.method == "wint8" or in_features <= self.group_size:
            g = in_features
        elif math.gcd(in_features, self.group_size) >= MIN_GROUP:
            g = math.gcd(in_features, self.group_size)
        else:
            raise ValueError(
                f"{self.method}: {in_features} input features is not a multiple of "
                f"group_size {self.group_size} (nor of {MIN_GROUP})"
            )
        if self.method == "wint4" and in_features % 2:
            raise ValueError(f"wint4 packs two features per byte: {in_features} is odd")
        return g


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] `[..., K]` (K even) -> uint8 `[..., K/2]`, two per byte."""
    assert q.shape[-1] % 2 == 0, q.shape
    u = (q.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., K/2]` -> int8 `[..., K]` in [-8, 7] (inverse of `pack_int4`)."""
    low = (packed & 0x0F).to(torch.int8) - INT4_OFFSET
    high = (packed >> 4).to(torch.int8) - INT4_OFFSET
    return torch.stack((low, high), dim=-1).flatten(-2)


def quantize(
    w: torch.Tensor, cfg: QuantConfig, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w `[..., N, K]` -> (qweight, scale `[..., N, G]` in `scale_dtype`, default w's dtype).

    qweight is int8 `[..., N, K]` (wint8) or packed uint8 `[..., N, K/2]` (wint4)."""
    # N output channels, K input features, G groups of g features
    *lead, n, k = w.shape
    g = cfg.group_for(k)
    qmax = QMAX[cfg.method]
    groups = w.detach().float().reshape(*lead, n, k // g, g)  # [..., N, G, g]
    scale = groups.abs().amax(dim=-1) / qmax  # [..., N, G]
    stored = scale.to(scale_dtype or w.dtype)
    scale = stored.float()  # quantize against the value that will be stored
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: q = 0
    q = torch.round(groups / safe[..., None]).clamp_(-qmax, qmax).to(torch.int8)
    q = q.reshape(*lead, n, k)
    return (pack_int4(q) if cfg.method == "wint4" else q), stored


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(qweight, scale `[..., N, G]`) -> weight `[..., N, K]` in `dtype`.

    The integer is exact in any float dtype (|q| <= 127), so `q * s` is rounded once, to
    `dtype`: the weight the float GEMM then reads."""
    q = unpack_int4(qweight) if qweight.dtype == torch.uint8 else qweight
    *lead, n, k = q.shape
    groups = scale.shape[-1]
    w = q.reshape(*lead, n, groups, k // groups).to(dtype) * scale.to(dtype)[..., None]
    return w.reshape(*lead, n, k)
