"""Prefill MoE through torch's grouped GEMM + the Triton gather-combine, vs the reference."""

from __future__ import annotations

import pytest
import torch

import kernels.triton_impl.moe_grouped as grouped
from kernels import fused_moe, fused_moe_ref, route
from kernels._dispatch import interpreting, triton_available

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)


@needs_triton
@pytest.mark.skipif(grouped.grouped_mm_fn() is None, reason="torch without grouped_mm")
@pytest.mark.parametrize(("t", "e", "k", "with_add"), [(37, 8, 3, True), (20, 5, 2, False)])
def test_grouped_matches_reference(
    monkeypatch: pytest.MonkeyPatch, t: int, e: int, k: int, with_add: bool
) -> None:
    d, i = 32, 48
    dt = torch.bfloat16
    x = torch.randn(t, d).to(dt)
    w13 = (torch.randn(e, 2 * i, d) / 4).to(dt)
    w2 = (torch.randn(e, d, i) / 4).to(dt)
    logits = torch.randn(t, e)
    logits[:, [1, e - 1]] = -1e9  # empty groups, one inside and one at the end
    weights, ids = route(logits, k)
    assert not ((ids == 1) | (ids == e - 1)).any()
    add = torch.randn(t, d).to(dt) if with_add else None
    monkeypatch.setattr(grouped, "GROUPED_MIN_ROWS", 1)
    assert grouped.use_grouped(x, t * k)
    got = fused_moe(x, w13, w2, weights, ids, impl="triton", add=add)
    want = fused_moe_ref(x, w13, w2, weights, ids)
    if add is not None:
        want = want + add
    assert got.shape == (t, d) and got.dtype == dt
    rel = (got.float() - want.float()).norm() / want.float().norm()
    assert rel < 1e-2, rel


def test_not_used_for_decode_sizes() -> None:
    x = torch.randn(4, 8).to(torch.bfloat16)
    assert not grouped.use_grouped(x, 4 * 6)
    assert not grouped.use_grouped(x.float(), 1 << 20)
