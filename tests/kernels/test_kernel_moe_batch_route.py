"""The router past the decode sizes in one launch (`batch_gate_route_triton`): fp32 logits
from bf16 tensor-core dots over three-piece splits of the fp32 weights, then the routing of
each token block by the program that arrives last. Against cuBLAS-style fp32 logits + the
torch routing, and through `kernels.moe.gate_route` behind `BATCH_ROUTER`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.moe as kmoe
from kernels._dispatch import interpreting, triton_available
from kernels.moe import gate_route, route

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)


def _router(t: int, e: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, d, generator=g) * 0.05
    bias = torch.rand(e, generator=g) * 0.2
    x = torch.randn(t, d, generator=g).to(torch.bfloat16)
    return x, w, bias


@needs_triton
@pytest.mark.parametrize(
    ("t", "e", "d", "k"),
    [
        (5, 64, 300, 6),  # 4 expert blocks, 2 hidden splits, a ragged last step
        (40, 7, 200, 3),  # 3 token blocks, experts padded to 16, 2 splits
        (70, 20, 130, 2),  # 32-token blocks, the last one ragged, 1 split
    ],
)
def test_batch_gate_route_matches_fp32_logits_then_route(t, e, d, k) -> None:
    """Ids equal and weights within 1e-5 of `route(F.linear(x.float(), W))`: the three bf16
    pieces keep the logits fp32-accurate (one piece alone misses by ~1e-3 here); twice, so
    the arrival counters must reset."""
    from kernels.triton_impl import moe_routing as mr

    x, w, bias = _router(t, e, d, seed=t * 100 + e)
    splits, _ = mr.batch_route_splits(t, e, d, mr.pick_batch_route_tiles(t), x.device)
    assert splits == {5: 2, 40: 2, 70: 1}[t]  # the cases cover one and several splits
    for rep in range(2):
        xr = x if rep == 0 else x.flip(0)
        want_w, want_ids = route(F.linear(xr.float(), w), k, bias, impl="torch")
        got_w, got_ids = mr.batch_gate_route_triton(xr, w, k, bias, 1e-12)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)
        assert not mr._BATCH_COUNTERS[x.device].any()


@needs_triton
def test_one_bf16_piece_would_not_do() -> None:
    """What the split buys: the weights rounded to one bf16 piece move the logits by ~1e-3,
    200x the bound the kernel meets above (so that test can tell the two apart)."""
    x, w, _ = _router(16, 64, 300, seed=7)
    exact = F.linear(x.double(), w.double())
    one_piece = F.linear(x.float(), w.to(torch.bfloat16).float()).double()
    three = w.to(torch.bfloat16).float()
    rest = w - three
    three = three + rest.to(torch.bfloat16).float()
    three = three + (w - three).to(torch.bfloat16).float()
    assert torch.equal(three, w)  # the three pieces sum back to the fp32 weights exactly
    assert (one_piece - exact).abs().max() > 2e-3


@needs_triton
def test_batch_route_ties_go_to_the_first_expert() -> None:
    """Pairs of identical router rows give bit-equal logits in the same program; the top-k
    takes the lower index first, as the decode kernel does (torch.topk may order them
    either way)."""
    from kernels.triton_impl import moe_routing as mr

    t, e, d, k = 4, 16, 64, 5
    x, w, bias = _router(t, e, d, seed=3)
    w[1::2] = w[0::2]
    bias[1::2] = bias[0::2]
    got_w, got_ids = mr.batch_gate_route_triton(x, w, k, bias, 1e-12)
    want_w, want_ids = mr.gate_route_triton(x, w, k, bias, 1e-12)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-6)
    # each tied pair is taken together, the even expert first
    for row in got_ids.tolist():
        for j in range(0, k - 1, 2):
            assert row[j] % 2 == 0 and row[j + 1] == row[j] + 1


@needs_triton
def test_gate_route_takes_the_batch_kernel_only_when_asked(monkeypatch) -> None:
    """`BATCH_ROUTER` on: bf16 batches past the decode sizes go to the batch launch (same
    ids as off); fp32 rows, decode sizes and switched off keep their paths."""
    from kernels.triton_impl import moe_routing as mr

    calls: list[int] = []
    real = mr.batch_gate_route_triton

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(mr, "batch_gate_route_triton", spy)
    x, w, bias = _router(9, 8, 48, seed=5)
    off = gate_route(x, w, 2, bias, impl="triton")
    assert calls == []
    monkeypatch.setattr(kmoe, "BATCH_ROUTER", True)
    on = gate_route(x, w, 2, bias, impl="triton")
    assert calls == [9]
    assert torch.equal(on[1], off[1])
    torch.testing.assert_close(on[0], off[0], atol=1e-5, rtol=1e-5)
    gate_route(x.float(), w, 2, bias, impl="triton")  # fp32 rows: cuBLAS + route
    gate_route(x[:3], w, 2, bias, impl="triton")  # decode size: the GEMV router
    gate_route(x, w, 2, bias, impl="torch")
    assert calls == [9]
    monkeypatch.setattr(mr, "BATCH_ROUTE_MAX_TOKENS", 8)
    gate_route(x, w, 2, bias, impl="triton")
    assert calls == [9]
