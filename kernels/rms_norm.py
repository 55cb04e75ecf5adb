"""RMSNorm with an optional fused residual add (ERNIE-4.5: ``x * rsqrt(mean(x^2) + eps) * w``).

Rounding follows transformers' ``Ernie4_5RMSNorm`` step by step so the engine matches the HF
model bit for bit in bf16: the residual sum is rounded to x's dtype (it is what the next layer
adds to), the normalised value is computed in fp32 and rounded to x's dtype, then multiplied by
the weight and rounded again.
"""

from __future__ import annotations

import torch

from kernels._dispatch import Impl, use_triton


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`rms_norm`."""
    # T tokens, D hidden
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)  # [T, D]
    hf = h.float()
    variance = hf.pow(2).mean(-1, keepdim=True)  # [T, 1]
    normed = (hf * torch.rsqrt(variance + eps)).to(x.dtype)
    out = (weight.float() * normed.float()).to(x.dtype)
    return out, h


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    impl: Impl = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, residual_out)``, both ``[T, D]`` in x's dtype.

    With ``residual``: ``h = x + residual``, ``out = rmsnorm(h) * weight``, ``residual_out = h``.
    Without: ``out = rmsnorm(x) * weight`` and ``residual_out`` is x itself.
    """
    assert x.dim() == 2, f"x must be [T, D], got {tuple(x.shape)}"
    assert weight.shape == (x.shape[1],), (weight.shape, x.shape)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, x.shape)
    if not use_triton(x, impl):
        return rms_norm_ref(x, weight, eps, residual)
    from kernels.triton_impl.rms_norm import rms_norm_triton

    return rms_norm_triton(x, weight, eps, residual)
