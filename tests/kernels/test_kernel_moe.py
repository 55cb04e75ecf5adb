"""MoE: routing and expert sum vs transformers' ERNIE-4.5-VL modules, alignment invariants,
Triton grouped GEMM vs reference."""

from __future__ import annotations

import pytest
import torch
from transformers.models.ernie4_5_vl_moe import modeling_ernie4_5_vl_moe as hf_vl
from transformers.models.ernie4_5_vl_moe.configuration_ernie4_5_vl_moe import (
    Ernie4_5_VLMoeTextConfig,
)

from kernels import fused_moe, fused_moe_ref, moe_align_block_size, route
from kernels._dispatch import interpreting, triton_available

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)


def _config(num_experts: int, k: int, hidden: int, inter: int) -> Ernie4_5_VLMoeTextConfig:
    return Ernie4_5_VLMoeTextConfig(
        hidden_size=hidden,
        num_attention_heads=2,
        head_dim=16,
        num_experts=num_experts,
        num_experts_per_tok=k,
        moe_intermediate_size=[inter, inter],
    )


@pytest.mark.parametrize(
    ("num_experts", "k", "with_bias"), [(8, 2, False), (8, 2, True), (7, 3, True), (5, 1, True)]
)
def test_route_matches_transformers(num_experts: int, k: int, with_bias: bool) -> None:
    router = hf_vl.Ernie4_5_VLMoeMoeTopKRouter(_config(num_experts, k, 32, 16))
    with torch.no_grad():
        router.weight.copy_(torch.randn(num_experts, 32))
        if with_bias:  # large enough to change which experts win
            router.moe_statics.e_score_correction_bias.copy_(torch.rand(1, num_experts) * 0.5)
    x = torch.randn(11, 32)
    logits, hf_weights, hf_ids = router(x)
    bias = router.moe_statics.e_score_correction_bias[0] if with_bias else None
    weights, ids = route(logits, k, bias)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.long(), hf_ids)
    torch.testing.assert_close(weights, hf_weights, atol=1e-7, rtol=1e-6)


def test_bias_selects_but_does_not_weight() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, ids = route(logits, 2, torch.tensor([0.0, 0.0, 0.0, 10.0]))
    assert sorted(ids[0].tolist()) == [0, 3]
    probs = torch.softmax(logits, -1)[0]
    expected = probs[ids[0].long()] / probs[[0, 3]].sum()
    torch.testing.assert_close(weights[0], expected)


def test_reference_matches_transformers_experts() -> None:
    e, k, d, i = 6, 2, 24, 20
    experts = hf_vl.Ernie4_5_VLMoeMoeExperts(_config(e, k, d, i), intermediate_size=i)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(e, 2 * i, d) / 5)
        experts.down_proj.copy_(torch.randn(e, d, i) / 5)
    x = torch.randn(9, d)
    weights, ids = route(torch.randn(9, e), k)
    with torch.no_grad():
        expected = experts(x, ids.long(), weights)
        out = fused_moe_ref(x, experts.gate_up_proj, experts.down_proj, weights, ids)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reference_matches_per_token_loop() -> None:
    e, k, d, i, t = 5, 3, 16, 12, 6
    x, w13, w2 = torch.randn(t, d), torch.randn(e, 2 * i, d), torch.randn(e, d, i)
    weights, ids = route(torch.randn(t, e), k)
    expected = torch.zeros(t, d)
    for tok in range(t):
        for j in range(k):
            ex = int(ids[tok, j])
            h = w13[ex] @ x[tok]
            expected[tok] += weights[tok, j] * (w2[ex] @ (torch.nn.functional.silu(h[:i]) * h[i:]))
    out = fused_moe_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("t", "k", "e", "block_m"), [(1, 1, 4, 16), (13, 2, 5, 4), (9, 3, 8, 16)])
def test_align_block_size(t: int, k: int, e: int, block_m: int) -> None:
    ids = torch.randint(0, e, (t, k), dtype=torch.int32)
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, e, block_m)
    n, used = t * k, int(num_post)
    assert used % block_m == 0 and sorted_ids.shape[0] % block_m == 0
    assert sorted_ids.shape[0] >= used
    real = sorted_ids[sorted_ids < n]
    assert sorted(real.tolist()) == list(range(n))  # each (token, slot) exactly once
    assert bool((sorted_ids[used:] == n).all())
    flat = ids.reshape(-1)
    for blk in range(used // block_m):
        rows = sorted_ids[blk * block_m : (blk + 1) * block_m]
        rows = rows[rows < n].long()
        assert bool((flat[rows] == expert_ids[blk]).all())
    assert bool((expert_ids[used // block_m :] == -1).all())
    # Blocks per expert = ceil(count / block_m): padding is minimal.
    counts = torch.bincount(flat.long(), minlength=e)
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum())


@needs_triton
@pytest.mark.parametrize(
    ("t", "d", "i", "e", "k", "dtype", "blocks"),
    [
        (7, 32, 24, 5, 2, torch.float32, (16, 16, 16)),
        (1, 16, 16, 4, 1, torch.float32, (16, 16, 16)),  # a single decode token
        (10, 40, 20, 6, 3, torch.float16, (16, 32, 16)),  # D, I not multiples of the tiles
        (12, 32, 32, 3, 2, torch.float32, (32, 16, 32)),  # experts with several row blocks
    ],
)
def test_triton_matches_reference(
    t: int, d: int, i: int, e: int, k: int, dtype: torch.dtype, blocks: tuple[int, int, int]
) -> None:
    from kernels.triton_impl.moe import fused_moe_triton

    x = torch.randn(t, d).to(dtype)
    w13 = (torch.randn(e, 2 * i, d) / d**0.5).to(dtype)
    w2 = (torch.randn(e, d, i) / i**0.5).to(dtype)
    weights, ids = route(torch.randn(t, e), k)
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    bm, bn, bk = blocks
    out = fused_moe_triton(x, w13, w2, weights, ids, block_m=bm, block_n=bn, block_k=bk)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@needs_triton
def test_dispatch_runs_triton_path() -> None:
    x, w13, w2 = torch.randn(5, 16), torch.randn(4, 32, 16) / 4, torch.randn(4, 16, 16) / 4
    weights, ids = route(torch.randn(5, 4), 2)
    out = fused_moe(x, w13, w2, weights, ids, impl="triton")
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)
