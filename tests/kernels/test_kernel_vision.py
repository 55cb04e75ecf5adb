"""Vision-tower kernels: 2-D rotary of q/k from the fused qkv and QuickGELU (Triton in the
CPU interpreter vs the torch references)."""

from __future__ import annotations

import pytest
import torch

from engine.layers.rotary import VisionRotary
from kernels import triton_available
from kernels.vision import quick_gelu, quick_gelu_ref, vision_rotary_qk, vision_rotary_qk_ref

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")


def test_rotary_ref_matches_vision_rotary() -> None:
    n, h, d = 12, 3, 16
    qkv = torch.randn(n, 3 * h * d)
    rotary = VisionRotary(d, 10000.0)
    cos, sin = rotary.cos_sin(torch.randint(0, 8, (n, 2)))
    q, k = vision_rotary_qk_ref(qkv, cos, sin, h)
    q0, k0, _ = qkv.view(n, 3, h, d).unbind(1)
    assert torch.allclose(q, VisionRotary.apply(q0, cos, sin), atol=1e-6)
    assert torch.allclose(k, VisionRotary.apply(k0, cos, sin), atol=1e-6)


@needs_triton
@pytest.mark.parametrize(
    ("n", "h", "d", "dtype"), [(7, 4, 16, torch.float32), (5, 16, 80, torch.bfloat16)]
)
def test_rotary_triton(n: int, h: int, d: int, dtype: torch.dtype) -> None:
    qkv = torch.randn(n, 3 * h * d, dtype=dtype)
    cos, sin = VisionRotary(d, 10000.0).cos_sin(torch.randint(0, 32, (n, 2)))
    q, k = vision_rotary_qk(qkv, cos, sin, h, impl="triton")
    q_ref, k_ref = vision_rotary_qk_ref(qkv, cos, sin, h)
    assert q.shape == k.shape == (n, h, d) and q.is_contiguous() and k.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k, k_ref, atol=tol, rtol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quick_gelu_triton(dtype: torch.dtype) -> None:
    x = (torch.randn(9, 300) * 3).to(dtype)
    got, want = quick_gelu(x, impl="triton"), quick_gelu_ref(x)
    assert got.shape == x.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
