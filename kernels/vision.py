"""Kernels of the ViT tower: its 2-D rotary on q and k straight from the fused qkv output,
and QuickGELU. On GPU each is one Triton pass instead of ~10 (rotary) / 3 (QuickGELU)
eager elementwise kernels; the torch references define the semantics (and run on CPU).
"""

from __future__ import annotations

import torch

from kernels._dispatch import Impl, use_triton


def vision_rotary_qk_ref(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv `[N, 3*H*D]` -> rotated (q, k), each `[N, H, D]` contiguous; cos/sin `[N, D]` fp32.

    Half-split rotation in fp32, rounded once: ``x * cos + cat(-x2, x1) * sin``."""
    n = qkv.shape[0]
    q, k, _ = qkv.view(n, 3, num_heads, -1).unbind(1)
    c, s = cos[:, None, :], sin[:, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype)

    return rot(q), rot(k)


def vision_rotary_qk(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, impl: Impl = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`vision_rotary_qk_ref`; one launch for q and k on GPU."""
    # N patches, H heads, D head dim
    n, width = qkv.shape
    d = width // (3 * num_heads)
    assert width == 3 * num_heads * d and d % 2 == 0, (qkv.shape, num_heads)
    assert cos.shape == sin.shape == (n, d), (cos.shape, sin.shape, n, d)
    if not use_triton(qkv, impl):
        return vision_rotary_qk_ref(qkv, cos, sin, num_heads)
    from kernels.triton_impl.vision import vision_rotary_qk_triton

    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    return vision_rotary_qk_triton(qkv, cos, sin, num_heads)


def quick_gelu_ref(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def quick_gelu(x: torch.Tensor, impl: Impl = None) -> torch.Tensor:
    """``x * sigmoid(1.702 x)`` for x `[T, F]`, rounded step by step as the eager ops are."""
    assert x.dim() == 2, x.shape
    if not use_triton(x, impl):
        return quick_gelu_ref(x)
    from kernels.triton_impl.vision import quick_gelu_triton

    return quick_gelu_triton(x)
