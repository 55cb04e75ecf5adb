"""One-launch MoE glue: Triton routing and expert sort vs the torch references; decode
attention with graph-width block tables."""

from __future__ import annotations

import pytest
import torch

from kernels import moe_align_block_size, paged_attention, paged_attention_ref, route
from kernels._dispatch import interpreting, triton_available
from kernels.moe import gate_route

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)


@needs_triton
@pytest.mark.parametrize(
    ("t", "e", "k", "with_bias"), [(1, 64, 6, True), (19, 8, 2, False), (6, 7, 3, True)]
)
def test_route_kernel_matches_reference(t: int, e: int, k: int, with_bias: bool) -> None:
    logits = torch.randn(t, e)
    bias = torch.rand(e) * 0.3 if with_bias else None  # big enough to change the winners
    want_w, want_ids = route(logits, k, bias, impl="torch")
    got_w, got_ids = route(logits, k, bias, impl="triton")
    assert torch.equal(got_ids, want_ids)  # same experts, same (descending) order
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-6)


@needs_triton
@pytest.mark.parametrize(
    ("t", "e", "d", "k", "dtype"),
    [(1, 64, 600, 6, torch.float16), (4, 7, 96, 3, torch.float32), (3, 9, 1030, 2, torch.float16)],
)
def test_gate_route_kernel_matches_cublas_then_route(t, e, d, k, dtype) -> None:
    """Router GEMV + routing in one launch (split over programs, the last one routes)
    equals `route(F.linear(x.float(), W))`; twice, so the arrival counters reset."""
    g = torch.Generator().manual_seed(t * 100 + e)
    w = torch.randn(e, d, generator=g) * 0.05
    bias = torch.rand(e, generator=g) * 0.2
    for _ in range(2):
        x = torch.randn(t, d, generator=g).to(dtype)
        want_w, want_ids = gate_route(x, w, k, bias, impl="torch")
        got_w, got_ids = gate_route(x, w, k, bias, impl="triton")
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize(("t", "e", "k"), [(1, 64, 6), (4, 7, 3), (2, 9, 8)])
def test_gate_route_ranked_top_k_is_bit_identical(monkeypatch, t: int, e: int, k: int) -> None:
    """The router's top-k by ranking every expert at once picks the same experts in the same
    slots with the same weights as k rounds of argmax, ties included (first index wins), and
    without ties the same as torch."""
    import kernels.triton_impl.moe_routing as mr

    g = torch.Generator().manual_seed(e * 10 + k)
    for tied in (False, True):
        w = torch.randn(e, 16, generator=g) * 0.05
        if tied:
            w[1::2] = w[0::2][: e // 2]  # pairs of equal logits: ties to break by index
        x = torch.randn(t, 16, generator=g)
        for bias in (None, torch.rand(e, generator=g) * 0.2):
            outs = []
            for ranked in (False, True):
                monkeypatch.setattr(mr, "TOPK_RANKED", ranked)
                outs.append(mr.gate_route_triton(x, w, k, bias, 1e-12))
            assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][0], outs[1][0])
            if not tied:  # torch.topk orders tied experts either way
                want_w, want_ids = gate_route(x, w, k, bias, impl="torch")
                assert torch.equal(outs[1][1], want_ids)
                torch.testing.assert_close(outs[1][0], want_w, atol=1e-6, rtol=1e-6)


@needs_triton
@pytest.mark.parametrize(
    ("t", "k", "e", "block_m"), [(1, 6, 64, 16), (13, 2, 5, 4), (40, 3, 8, 16)]
)
def test_align_kernel_matches_reference(t: int, k: int, e: int, block_m: int) -> None:
    from kernels.triton_impl.moe_routing import moe_align_triton

    ids = torch.randint(0, e, (t, k), dtype=torch.int32)
    got_sorted, got_experts, got_used = moe_align_triton(ids, e, block_m)
    want_sorted, want_experts, want_used = moe_align_block_size(ids, e, block_m)
    assert torch.equal(got_experts, want_experts) and torch.equal(got_used, want_used)
    assert got_sorted.shape == want_sorted.shape
    # Rows of a run come in any order (atomics): compare each block as a set.
    for blk in range(got_experts.shape[0]):
        rows = slice(blk * block_m, (blk + 1) * block_m)
        assert sorted(got_sorted[rows].tolist()) == sorted(want_sorted[rows].tolist())


@needs_triton
def test_decode_kernel_with_graph_width_tables() -> None:
    """CUDA graphs pad block tables to the longest possible sequence; the kernel must split
    each sequence by its own length (padding rows: seq_len 1) and still match."""
    hq, hkv, d, bs, width = 4, 2, 16, 4, 64
    lens = [1, 37, 12, 1]
    num_blocks = 40
    kc, vc = torch.randn(num_blocks, bs, hkv, d), torch.randn(num_blocks, bs, hkv, d)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    perm = torch.randperm(num_blocks)
    used = 0
    for b, n in enumerate(lens):
        m = -(-n // bs)
        tables[b, :m] = perm[used : used + m].int()
        used += m
    sl = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    q = torch.randn(len(lens), hq, d)
    ref = paged_attention_ref(q, kc, vc, tables, sl, qsl, d**-0.5)
    out = paged_attention(q, kc, vc, tables, sl, qsl, d**-0.5, impl="triton")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@needs_triton
@pytest.mark.parametrize("with_add", [False, True])
def test_fused_moe_add_matches_unfused(with_add: bool) -> None:
    from kernels import fused_moe, fused_moe_ref

    t, d, i, e, k = 5, 32, 16, 4, 2
    x = torch.randn(t, d)
    w13, w2 = torch.randn(e, 2 * i, d) / d**0.5, torch.randn(e, d, i) / i**0.5
    weights, ids = route(torch.randn(t, e), k)
    add = torch.randn(t, d) if with_add else None
    want = fused_moe_ref(x, w13, w2, weights, ids)
    want = want if add is None else want + add
    got = fused_moe(x, w13, w2, weights, ids, impl="triton", add=add)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul_kernel(dtype: torch.dtype) -> None:
    from kernels.activation import silu_and_mul, silu_and_mul_ref

    x = torch.randn(3, 2 * 1100).to(dtype)  # I not a multiple of the block
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    got = silu_and_mul(x, impl="triton")
    torch.testing.assert_close(got, silu_and_mul_ref(x), atol=tol, rtol=tol)
