"""Triton kernels for :mod:`kernels.vision`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import next_pow2


@triton.jit
def _vision_rotary_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    N,
    stride_qkv,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program per patch: rotates its q and k heads, writes them contiguous [N, H, D].
    t = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)  # 0 = q, 1 = k
    offs_h = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_HALF)
    mask_p = offs_p < D // 2
    mask = (offs_h[:, None] < H) & mask_p[None, :]
    c1 = tl.load(cos_ptr + t * D + offs_p, mask=mask_p, other=1.0)[None, :]
    c2 = tl.load(cos_ptr + t * D + D // 2 + offs_p, mask=mask_p, other=1.0)[None, :]
    s1 = tl.load(sin_ptr + t * D + offs_p, mask=mask_p, other=0.0)[None, :]
    s2 = tl.load(sin_ptr + t * D + D // 2 + offs_p, mask=mask_p, other=0.0)[None, :]
    src = qkv_ptr + t * stride_qkv + which * H * D + offs_h[:, None] * D + offs_p[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)  # [BLOCK_H, BLOCK_HALF] first halves
    x2 = tl.load(src + D // 2, mask=mask, other=0.0)  # second halves
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    o1 = a * c1 + (-b) * s1
    o2 = b * c2 + a * s2
    dst = out_ptr + (which * N + t) * H * D + offs_h[:, None] * D + offs_p[None, :]
    tl.store(dst, o1.to(x1.dtype), mask=mask)
    tl.store(dst + D // 2, o2.to(x1.dtype), mask=mask)


def vision_rotary_qk_triton(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # N patches, H heads, D head dim; qkv [N, 3*H*D] (q heads, k heads, v heads)
    n, width = qkv.shape
    d = width // (3 * num_heads)
    assert qkv.stride(1) == 1, qkv.stride()
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == (n, d), cos.shape
    qk = torch.empty(2, n, num_heads, d, dtype=qkv.dtype, device=qkv.device)  # [2, N, H, D]
    if n == 0:
        return qk[0], qk[1]
    _vision_rotary_kernel[(n, 2)](
        qkv,
        cos,
        sin,
        qk,
        n,
        qkv.stride(0),
        H=num_heads,
        D=d,
        BLOCK_H=next_pow2(num_heads),
        BLOCK_HALF=next_pow2(d // 2),
    )
    return qk[0], qk[1]


@triton.jit
def _quick_gelu_kernel(x_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    # Round where the eager ops round: 1.702 * x, then sigmoid, then the product.
    z = (xf * 1.702).to(x.dtype).to(tl.float32)
    s = (1.0 / (1.0 + tl.exp(-z))).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + offs, (xf * s).to(x.dtype), mask=mask)


def quick_gelu_triton(x: torch.Tensor) -> torch.Tensor:
    # x [T, F], any float dtype; elementwise over the contiguous buffer
    x = x.contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out
    block = 2048
    _quick_gelu_kernel[(triton.cdiv(numel, block),)](x, out, numel, BLOCK=block)
    return out
