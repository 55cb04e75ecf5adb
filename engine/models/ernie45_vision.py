"""ERNIE-4.5-VL's vision side: a ViT over 14x14 patches with 2-D rotary, then the
variable-resolution resampler that merges 2x2 patches (and 2 frames of video) into one
language-model token.

Patches arrive flattened `[N, 3*14*14]` in the processor's order: every 4 consecutive
patches form one 2x2 merge block, frames follow each other. Attention is full within a
frame and never crosses frames or images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TextConfig, VisionConfig
from engine.layers.linear import Linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import VisionRotary

Grid = tuple[int, int, int]  # (t, h, w) in patches


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, bias=True)
        self.proj = Linear(dim, dim, bias=True)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], frame_lens: list[int]
    ) -> torch.Tensor:
        # N patches, H heads, D head dim
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # each [N, H, D]
        q, k = VisionRotary.apply(q, *rope), VisionRotary.apply(k, *rope)
        # [1, H, n, D]: 4-D inputs let SDPA pick its fused kernels (3-D falls back to math)
        outs = [
            F.scaled_dot_product_attention(
                qf.transpose(0, 1)[None], kf.transpose(0, 1)[None], vf.transpose(0, 1)[None]
            )[0].transpose(0, 1)
            for qf, kf, vf in zip(
                q.split(frame_lens), k.split(frame_lens), v.split(frame_lens), strict=True
            )
        ]
        return self.proj(torch.cat(outs).reshape(n, -1))


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
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], frame_lens: list[int]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, frame_lens)
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
        frame_lens = [h * w for t, h, w in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, rope, frame_lens)
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
