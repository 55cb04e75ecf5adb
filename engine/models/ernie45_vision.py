"""ERNIE-4.5-VL's vision side: a ViT over 14x14 patches with 2-D rotary, then the
variable-resolution resampler that merges 2x2 patches (and 2 frames of video) into one
language-model token.

Patches arrive flattened `[N, 3*14*14]` in the processor's order: every 4 consecutive
patches form one 2x2 merge block, frames follow each other. Attention is full within a
frame and never crosses frames or images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TextConfig, VisionConfig
from engine.layers.linear import Linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import VisionRotary
from kernels.vision import quick_gelu, vision_rotary_qk

Grid = tuple[int, int, int]  # (t, h, w) in patches


@dataclass(frozen=True)
class Frames:
    """Where the frames sit in the patch rows: attention is block-diagonal over them.

    `runs`: (first row, frames, patches per frame) of each run of consecutive equal-sized
    frames (a batch of same-size images is one run); `cu_seqlens [F+1]` int32 row offsets and
    `max_len` for the varlen flash path (CUDA)."""

    runs: tuple[tuple[int, int, int], ...]
    cu_seqlens: torch.Tensor
    max_len: int

    @staticmethod
    def of(frame_lens: list[int], device: torch.device) -> Frames:
        runs: list[list[int]] = []
        start = 0
        for n in frame_lens:
            if runs and runs[-1][2] == n:
                runs[-1][1] += 1
            else:
                runs.append([start, 1, n])
            start += n
        cu = torch.tensor([0, *frame_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return Frames(
            tuple((a, b, c) for a, b, c in runs), cu.to(device), max(frame_lens, default=0)
        )


def _varlen_attn() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


# "varlen": one flash-attention launch over all frames (CUDA, if torch has it); "runs": one
# batched SDPA per run of equal-sized frames. The bench flips this to compare them.
ATTENTION_PATH = "varlen"


def frame_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: Frames
) -> torch.Tensor:
    """Full attention within each frame: q, k, v `[N, H, D]` (last dim contiguous) -> same."""
    varlen = _varlen_attn() if q.is_cuda and ATTENTION_PATH == "varlen" else None
    if varlen is not None and len(frames.runs) > 1:
        cu, m = frames.cu_seqlens, frames.max_len
        return varlen(q, k, v, cu, cu, m, m)
    outs = []
    for start, count, length in frames.runs:
        rows = slice(start, start + count * length)
        # [F, H, L, D] views; 4-D inputs let SDPA pick its fused kernels
        qf, kf, vf = (t[rows].unflatten(0, (count, length)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qf, kf, vf)  # [F, H, L, D]
        outs.append(out.transpose(1, 2).flatten(0, 1))  # [F*L, H, D]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, bias=True)
        self.proj = Linear(dim, dim, bias=True)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], frames: Frames
    ) -> torch.Tensor:
        # N patches, H heads, D head dim
        n = x.shape[0]
        qkv = self.qkv(x)  # [N, 3*H*D]
        q, k = vision_rotary_qk(qkv, *rope, self.num_heads)  # [N, H, D] each, contiguous
        v = qkv.view(n, 3, self.num_heads, -1)[:, 2]  # [N, H, D]
        return self.proj(frame_attention(q, k, v, frames).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=True)
        self.fc2 = Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], frames: Frames
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, frames)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.proj = Linear(cfg.in_channels * cfg.patch_size**2, cfg.hidden_size, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels.to(self.proj.weight.dtype))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.merge = cfg.spatial_merge_size
        self.patch_embed = PatchEmbed(cfg)
        self.rotary = VisionRotary(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def patch_positions(self, grids: list[Grid], device: torch.device) -> torch.Tensor:
        """(row, col) of every patch `[N, 2]`, in the processor's merge-block order."""
        m = self.merge
        out = []
        for t, h, w in grids:
            rows = torch.arange(h, device=device)[:, None].expand(h, w)
            cols = torch.arange(w, device=device)[None, :].expand(h, w)
            hw = torch.stack([rows, cols], dim=-1)  # [h, w, 2]
            hw = hw.reshape(h // m, m, w // m, m, 2).transpose(1, 2).reshape(-1, 2)
            out.append(hw.repeat(t, 1))
        return torch.cat(out)

    def forward(self, pixels: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """pixels `[N, 3*P*P]` -> features `[N, C]`."""
        x = self.patch_embed(pixels)
        rope = self.rotary.cos_sin(self.patch_positions(grids, x.device))
        frames = Frames.of([h * w for t, h, w in grids for _ in range(t)], x.device)
        for block in self.blocks:
            x = block(x, rope, frames)
        return self.ln(x)


class ResamplerMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.fc1 = Linear(in_dim, out_dim, bias=True)
        self.fc2 = Linear(out_dim, out_dim, bias=True)
        self.ln = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.fc2(F.gelu(self.fc1(x))))


class Resampler(nn.Module):
    """2x2 spatial merge, then 2-frame temporal merge (images pair a frame with itself)."""

    def __init__(self, vision: VisionConfig, text: TextConfig) -> None:
        super().__init__()
        self.merge = vision.spatial_merge_size
        spatial_dim = vision.hidden_size * self.merge**2
        self.spatial_linear = ResamplerMLP(spatial_dim, spatial_dim, vision.layer_norm_eps)
        self.temporal_linear = ResamplerMLP(2 * spatial_dim, spatial_dim, vision.layer_norm_eps)
        self.mlp = Linear(spatial_dim, text.hidden_size, bias=True)
        self.after_norm = RMSNorm(text.hidden_size, text.rms_norm_eps)

    def temporal_pairs(self, grids: list[Grid], device: torch.device) -> torch.Tensor:
        """Row indices `[2, M]` of the (even, odd) frame tokens merged into each output token."""
        firsts, seconds, offset = [], [], 0
        for t, h, w in grids:
            per_frame = h * w // self.merge**2
            odd_start = 1 if t > 1 else 0
            for even, odd in zip(range(0, t, 2), range(odd_start, t, 2), strict=False):
                firsts.append(torch.arange(per_frame) + offset + even * per_frame)
                seconds.append(torch.arange(per_frame) + offset + odd * per_frame)
            offset += t * per_frame
        return torch.stack([torch.cat(firsts), torch.cat(seconds)]).to(device)

    def forward(self, x: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """ViT features `[N, C]` -> language-model embeddings `[M, D]`."""
        x = self.spatial_linear(x.reshape(-1, x.shape[-1] * self.merge**2))
        pairs = self.temporal_pairs(grids, x.device)
        x = torch.cat([x[pairs[0]], x[pairs[1]]], dim=-1)
        x = self.temporal_linear(x)
        return self.after_norm(self.mlp(x))


def num_media_tokens(grid: Grid, merge: int = 2, temporal_merge: int = 2) -> int:
    """Language-model tokens one image/video grid turns into."""
    t, h, w = grid
    frames = 1 if t == 1 else t // temporal_merge
    return frames * (h // merge) * (w // merge)
