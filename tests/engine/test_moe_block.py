"""The MoE block's decode path that hands the shared experts to the routed experts' launches
passes the right weights: same output as the shared MLP run on its own. (The kernel itself is
checked in tests/kernels/test_kernel_moe_shared.py; on GPU the block takes this path at
T <= 4.)"""

from __future__ import annotations

import pytest
import torch

import engine.layers.moe as moe_layer
import kernels.moe as kmoe
from engine.layers.norm import RMSNorm


@pytest.mark.parametrize("t", [1, 3])
def test_shared_experts_handed_to_the_decode_launches(monkeypatch, small_moe_block, t: int) -> None:
    block = small_moe_block(t)
    x = torch.randn(t, 32)
    with torch.no_grad():
        want = block(x)
        seen = []
        real = kmoe.fused_moe

        def spy(*a, **kw):  # type: ignore[no-untyped-def]
            seen.append(kw.get("shared"))
            return real(*a, **kw)

        monkeypatch.setattr(moe_layer, "shares_decode_launches", lambda x: True)
        monkeypatch.setattr(moe_layer, "fused_moe", spy)
        got = block(x)
    [shared] = seen
    assert shared is not None and shared[0] is block.shared_experts.gate_up_proj.weight
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("decode", [False, True])
def test_add_norm_forward_equals_norm_then_block(
    monkeypatch, small_moe_block, decode: bool
) -> None:
    """`add_norm_forward(h, residual, norm)` = the block on `norm.add_forward(h, residual)`;
    on the decode path the norm goes to the router (`norm_gate_route`), elsewhere not."""
    block = small_moe_block(5)
    norm = RMSNorm(32, 1e-5)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
    h, residual = torch.randn(2, 32), torch.randn(2, 32)
    seen = []
    real = moe_layer.norm_gate_route

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        seen.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(moe_layer, "shares_decode_launches", lambda x: decode)
    monkeypatch.setattr(moe_layer, "norm_gate_route", spy)
    with torch.no_grad():
        x, want_residual = norm.add_forward(h, residual)
        want = block(x)
        got, got_residual = block.add_norm_forward(h, residual, norm)
    assert seen == ([h.shape] if decode else [])
    assert torch.equal(got_residual, want_residual)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("t", [8, 64])
def test_shared_experts_beside_the_router_at_batches(monkeypatch, small_moe_block, t: int) -> None:
    """Past the decode GEMV sizes the shared experts run on the side stream and the combine
    launch joins them: bit-identical to running them inline first, eager and in a CUDA
    graph (fork and join as graph edges), and the layer joins the side stream again."""
    from engine.layers import streams

    block = small_moe_block(t).cuda().to(torch.bfloat16)
    x = torch.randn(t, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        monkeypatch.setattr(moe_layer, "SHARED_SIDE_MAX_TOKENS", 0)
        want = block(x)
        mlp = block.shared_experts
        real = mlp.forward

        def slow(x: torch.Tensor) -> torch.Tensor:  # ~10 ms: a missing join reads too early
            torch.cuda._sleep(20_000_000)
            return real(x)

        monkeypatch.setattr(mlp, "forward", slow)
        monkeypatch.setattr(moe_layer, "SHARED_SIDE_MAX_TOKENS", 512)
        assert block._shared_beside_batch(x)
        got = block(x)
        streams.join(x.device)
        torch.cuda.synchronize()
        assert torch.equal(got, want)
        graph, static_x = torch.cuda.CUDAGraph(), x.clone()
        block(static_x)  # warm-up off the capture (Triton compiles, cuBLAS picks)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            out = block(static_x)
            streams.join(x.device)
        static_x.copy_(x * 2)
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.setattr(moe_layer, "SHARED_SIDE_MAX_TOKENS", 0)
        assert torch.equal(out, block(x * 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("contiguous", [True, False])
def test_fused_moe_waits_for_an_add_in_the_making(contiguous: bool) -> None:
    """`fused_moe(add=..., add_stream=side)` reads add only after the side stream is done,
    also when add first needs a contiguous copy (the copy reads it)."""
    from engine.layers import streams

    g = torch.Generator(device="cuda").manual_seed(0)
    t, d, e, i, k = 8, 32, 5, 24, 2
    x = torch.randn(t, d, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(e, 2 * i, d, device="cuda", generator=g) * 0.2).bfloat16()
    w2 = (torch.randn(e, d, i, device="cuda", generator=g) * 0.2).bfloat16()
    ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)]).int()
    weights = torch.rand(t, k, device="cuda").softmax(-1)
    ones = torch.ones(t, d, device="cuda", dtype=torch.bfloat16)
    want = kmoe.fused_moe(x, w13, w2, weights, ids, add=ones)
    base = torch.zeros(d, t, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    with streams.beside(x.device) as side:
        torch.cuda._sleep(20_000_000)  # ~10 ms before add is written
        if contiguous:
            add = torch.ones(t, d, device="cuda", dtype=torch.bfloat16)
        else:
            base.fill_(1)
    if not contiguous:
        add = base.t()  # a strided view: fused_moe copies it, after the join
    got = kmoe.fused_moe(x, w13, w2, weights, ids, add=add, add_stream=side)
    streams.join(x.device)
    torch.cuda.synchronize()
    assert torch.equal(got, want)
