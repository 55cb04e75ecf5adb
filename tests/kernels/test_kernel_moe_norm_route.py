"""The post-attention RMSNorm fused into the decode router launch (`norm_gate_route`): the
kernel against the norm kernel + `gate_route`, and a decoder stack with it on vs off."""

from __future__ import annotations

import importlib

import pytest
import torch

import kernels.moe as kmoe
from engine.config import ModelConfig
from engine.models import build_random_model
from engine.tiny import ensure_tiny_model
from kernels import rms_norm, rms_norm_ref
from kernels._dispatch import interpreting, triton_available
from kernels.moe import gate_route, norm_gate_route
from tests.engine.hf_models import Prompt
from tests.engine.tandem_forward import tandem_logits

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)


@needs_triton
@pytest.mark.parametrize(("t", "d"), [(1, 96), (2, 1030), (3, 33), (4, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_gate_route_kernel_matches_norm_then_route(t, d, dtype, with_residual) -> None:
    """x and residual_out bit-identical to the norm kernel; ids equal and weights as
    `gate_route` on that x; three times, so the arrival counters must reset."""
    from kernels.triton_impl.moe_routing import _counters

    e, k, eps = 9, 3, 1e-5
    g = torch.Generator().manual_seed(t * 1000 + d)
    gate_w = torch.randn(e, d, generator=g) * 0.05
    bias = torch.rand(e, generator=g) * 0.2
    norm_w = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    for _ in range(3):
        h = torch.randn(t, d, generator=g).to(dtype)
        residual = torch.randn(t, d, generator=g).to(dtype) if with_residual else None
        got_w, got_ids, x, res = norm_gate_route(
            h, residual, norm_w, eps, gate_w, k, bias, impl="triton"
        )
        want_x, want_res = rms_norm(h, norm_w, eps, residual, impl="triton")
        assert torch.equal(x, want_x) and torch.equal(res, want_res)
        ref_x, ref_res = rms_norm_ref(h, norm_w, eps, residual)
        assert torch.equal(res, ref_res)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]  # as test_kernel_rms_norm
        torch.testing.assert_close(x, ref_x, atol=tol, rtol=tol)
        want_w, want_ids = gate_route(want_x, gate_w, k, bias, impl="torch")
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)
        assert not _counters(h.device).any()


@needs_triton
def test_norm_gate_route_tiles_and_preload_are_bit_identical(monkeypatch) -> None:
    """Experts a program (1, 2, 4, 8) and router chunks read before the wait (0-4, None:
    the GEMVs' depth) change no product and no order: the same x, weights and ids."""
    from kernels.triton_impl import moe_routing
    from kernels.triton_impl.moe_routing import norm_gate_route_triton

    t, d, e, k = 2, 1030, 9, 3  # 1030 columns: chunks of 256 leave a ragged fifth
    g = torch.Generator().manual_seed(7)
    h = torch.randn(t, d, generator=g).half()
    residual = torch.randn(t, d, generator=g).half()
    norm_w = (1 + 0.1 * torch.randn(d, generator=g)).half()
    gate_w = torch.randn(e, d, generator=g) * 0.05
    outs = []
    for per, pre in ((2, None), (1, 0), (2, 3), (4, 3), (4, 4), (8, 2)):
        monkeypatch.setattr(moe_routing, "ROUTER_PRELOAD", pre)
        outs.append(
            norm_gate_route_triton(h, residual, norm_w, 1e-5, gate_w, k, None, 1e-12, per, 256)
        )
    for got in outs[1:]:
        for a, b in zip(got, outs[0], strict=True):
            assert torch.equal(a, b)
    want_x, _ = rms_norm(h, norm_w, 1e-5, residual, impl="triton")
    want_w, want_ids = gate_route(want_x, gate_w, k, None, impl="torch")
    assert torch.equal(outs[0][1], want_ids)
    torch.testing.assert_close(outs[0][0], want_w, atol=1e-5, rtol=1e-5)


def _forced_triton(x: torch.Tensor, impl: kmoe.Impl) -> bool:
    return impl != "torch"


@needs_triton
def test_decoder_stack_same_with_the_norm_fused_into_the_router(monkeypatch) -> None:
    """The tiny model over a 3-token step with kernels.moe and kernels.rms_norm on their
    Triton paths (interpreter), so the MoE layers take the decode path: the same logits with
    the norm in the router's launch as with the norm launch before it."""
    cfg = ModelConfig.from_dir(ensure_tiny_model())
    model = build_random_model(cfg, torch.float32, seed=5)
    p = Prompt(ids=[17, 101, 42])
    want = tandem_logits(model, cfg, p)  # CPU: torch references, no decode path
    monkeypatch.setattr(kmoe, "use_triton", _forced_triton)
    krms = importlib.import_module("kernels.rms_norm")  # `kernels.rms_norm` is the function
    monkeypatch.setattr(krms, "use_triton", _forced_triton)
    from kernels.triton_impl import moe_routing

    calls = []
    real = moe_routing.norm_gate_route_triton

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(a[0].shape[0])
        return real(*a, **kw)

    monkeypatch.setattr(moe_routing, "norm_gate_route_triton", spy)
    runs = {}
    for fused in (False, True):
        monkeypatch.setattr(kmoe, "FUSED_NORM_ROUTE", fused)
        runs[fused] = tandem_logits(model, cfg, p)
    assert calls == [3] * cfg.text.mlp_layer_types.count("sparse")  # fused run only
    assert torch.equal(runs[True], runs[False])
    torch.testing.assert_close(runs[True], want, atol=1e-4, rtol=1e-4)
