"""Rotary position embeddings of ERNIE-4.5 (1-D text, 3-D multimodal) and of its ViT (2-D).

Text: ERNIE rotates interleaved pairs (x[2j], x[2j+1]) by angle pos * inv_freq[j].
3-D (VL): the same pairs, but pair j reads a different position axis: for the first
h+w pairs even j uses the height index and odd j the width index ("h and w interleaved"),
and the last t pairs use the time index. With t = h = w (plain text) this reduces exactly
to the 1-D case, which is why text tokens of the VL model behave like ERNIE-4.5 text.
Vision tower: the classic half-split rotation with (h, h', w, w') frequency layout.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.rotary import rope_table

FUSED_TABLE = True
"""`TextRotary.step_table` builds the step's cos | sin table in one launch on CUDA
(`kernels.rotary.rope_table`) instead of six torch launches; read at trace time."""


class TextRotary(nn.Module):
    """Angles for positions `[T]` (1-D) or `[3, T]` (t, h, w) and their application."""

    def __init__(
        self, head_dim: int, theta: float, mrope_section: tuple[int, int, int] | None = None
    ) -> None:
        super().__init__()
        self.head_dim, self.theta, self.mrope_section = head_dim, theta, mrope_section
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        # axis[j] = which row of the [3, T] positions pair j reads (0 t, 1 h, 2 w).
        self.register_buffer("axis", torch.empty(head_dim // 2, dtype=torch.long), persistent=False)
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the buffers; also after `to_empty` from the meta device."""
        d = self.head_dim
        with torch.no_grad():
            arange = torch.arange(0, d, 2, dtype=torch.float, device=self.inv_freq.device)
            self.inv_freq.copy_(1.0 / (self.theta ** (arange / d)))
            self.axis.zero_()
            if self.mrope_section is not None:
                hw = self.mrope_section[0] + self.mrope_section[1]
                self.axis[:hw:2] = 1
                self.axis[1:hw:2] = 2

    def step_table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[T]` or `[3, T]` -> (table `[T, D]` fp32 = cos | sin, rows `[T]` int64).

        Token i's angles sit in row i, so `kernels.rotary_embedding(q, k, rows, table)` rotates
        q and k in one launch per layer. Built once per step (3-D positions resolved here), so
        no table of every position is kept and any position works."""
        axis = self.axis if positions.dim() == 2 else None  # pair j reads row axis[j]
        impl = None if FUSED_TABLE else "torch"
        table = rope_table(positions, self.inv_freq, axis, impl=impl)  # one launch on CUDA
        return table, torch.arange(table.shape[0], device=table.device)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x `[T, H, D]`, cos/sin `[T, D/2]` -> rotated x, computed in fp32."""
        dtype = x.dtype
        xf = x.float()
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        return out.to(dtype)


class VisionRotary(nn.Module):
    """2-D rotary of the ViT: a quarter of the head dim per axis, half-split rotation."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.spatial, self.theta = head_dim // 2, theta
        self.register_buffer("inv_freq", torch.empty(head_dim // 4), persistent=False)
        self.reset_tables()

    def reset_tables(self) -> None:
        s = self.spatial
        with torch.no_grad():
            arange = torch.arange(0, s, 2, dtype=torch.float, device=self.inv_freq.device)
            self.inv_freq.copy_(1.0 / (self.theta ** (arange / s)))

    def cos_sin(self, hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hw `[N, 2]` patch (row, col) -> cos, sin `[N, D]`."""
        freqs = hw[..., None].float() * self.inv_freq  # [N, 2, D/4]
        half = freqs.flatten(1)  # [N, D/2] = (h freqs, w freqs)
        full = torch.cat([half, half], dim=-1)
        return full.cos(), full.sin()

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x `[N, H, D]`, cos/sin `[N, D]`."""
        dtype = x.dtype
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        out = xf * cos[:, None, :] + rotated * sin[:, None, :]
        return out.to(dtype)
