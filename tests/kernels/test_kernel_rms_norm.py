"""rms_norm: reference vs transformers' Ernie4_5RMSNorm, Triton vs reference."""

from __future__ import annotations

import pytest
import torch
from transformers.models.ernie4_5.modeling_ernie4_5 import Ernie4_5RMSNorm

from kernels import rms_norm, rms_norm_ref
from kernels._dispatch import interpreting, triton_available

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_transformers(dtype: torch.dtype) -> None:
    """Bit-identical to HF, including the unfused residual add of the decoder layer."""
    t, d = 6, 48
    hf = Ernie4_5RMSNorm(d, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(d))
    x, residual = torch.randn(t, d).to(dtype), torch.randn(t, d).to(dtype)
    with torch.no_grad():
        out, res_out = rms_norm_ref(x, hf.weight, 1e-5)
        assert torch.equal(out, hf(x)) and res_out is x
        out, res_out = rms_norm_ref(x, hf.weight, 1e-5, residual)
        assert torch.equal(res_out, x + residual)
        assert torch.equal(out, hf(x + residual))


@needs_triton
@pytest.mark.parametrize(
    ("t", "d", "dtype"),
    # No bf16 here: the interpreter truncates fp32 -> bf16 where GPUs round to nearest.
    [(1, 16, torch.float32), (5, 33, torch.float16), (4, 100, torch.float16)],
)
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_matches_reference(t: int, d: int, dtype: torch.dtype, with_residual: bool) -> None:
    x = torch.randn(t, d).to(dtype)
    weight = torch.randn(d).to(dtype)
    residual = torch.randn(t, d).to(dtype) if with_residual else None
    ref_out, ref_res = rms_norm_ref(x, weight, 1e-6, residual)
    out, res = rms_norm(x, weight, 1e-6, residual, impl="triton")
    # rsqrt may differ in the last fp32 bit, which can flip the two 16-bit roundings: 2 ulps.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    assert torch.equal(res, ref_res)


@needs_triton
def test_triton_strided_rows() -> None:
    base = torch.randn(4, 64)
    x = base[:, :40]  # row stride 64
    weight = torch.randn(40)
    ref_out, _ = rms_norm_ref(x, weight, 1e-6)
    out, _ = rms_norm(x, weight, 1e-6, impl="triton")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
