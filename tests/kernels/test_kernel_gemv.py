"""Small-M GEMV and decode MoE GEMVs (kernels/triton_impl/gemv.py) vs torch, in the interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.triton_impl.moe as moe_impl
from kernels import fused_moe, fused_moe_ref, route
from kernels._dispatch import interpreting, triton_available
from kernels.gemv import linear, use_gemv

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def _fused_norm_calls(monkeypatch: pytest.MonkeyPatch, launcher: str) -> list[bool]:
    """Spy on `kernels.triton_impl.gemv.<launcher>`: one entry a call, True when it carried a
    fused norm."""
    import kernels.triton_impl.gemv as gemv_impl

    calls: list[bool] = []
    real = getattr(gemv_impl, launcher)

    def counting(*a, norm=None, **kw):  # type: ignore[no-untyped-def]
        calls.append(norm is not None)
        return real(*a, norm=norm, **kw)

    monkeypatch.setattr(gemv_impl, launcher, counting)
    return calls


@needs_triton
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_linear(m: int, dtype: torch.dtype, with_bias: bool) -> None:
    from kernels.triton_impl.gemv import GemvTiles, gemv_triton

    n, k = 37, 200  # neither a multiple of the tiles
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k**0.5
    b = torch.randn(n, dtype=dtype) if with_bias else None
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    for tiles in (None, GemvTiles(8, 64, 2), GemvTiles(4, 128, 4)):
        got = gemv_triton(x, w, b, tiles)
        assert got.shape == (m, n) and got.dtype == dtype
        assert _rel(got, ref) < (1e-6 if dtype == torch.float32 else 2e-3)


@needs_triton
def test_linear_dispatch_cpu_keeps_f_linear() -> None:
    x, w = torch.randn(1, 16), torch.randn(8, 16)
    assert not use_gemv(x, w) and use_gemv(x, w, impl="triton")
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=0, atol=0)  # auto: torch
    torch.testing.assert_close(linear(x, w, impl="triton"), F.linear(x, w), rtol=1e-6, atol=1e-6)
    x5 = torch.randn(5, 16)  # above GEMV_MAX_M: F.linear even when triton is asked for
    assert not use_gemv(x5, w, impl="triton")
    torch.testing.assert_close(linear(x5, w, impl="triton"), F.linear(x5, w), rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_decode_matches_ref(t: int, with_add: bool, dtype: torch.dtype) -> None:
    from kernels.triton_impl.gemv import MoeDecodeTiles, fused_moe_decode

    e, k, d, i = 7, 3, 96, 40  # I, D not multiples of the tiles
    x = torch.randn(t, d, dtype=dtype)
    w13 = (torch.randn(e, 2 * i, d) / d**0.5).to(dtype)
    w2 = (torch.randn(e, d, i) / i**0.5).to(dtype)
    weights, ids = route(torch.randn(t, e), k)
    add = torch.randn(t, d, dtype=dtype) if with_add else None
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    ref = ref if add is None else ref + add
    for tiles in (None, MoeDecodeTiles(16, 32, 8, 16, 2)):
        got = fused_moe_decode(x, w13, w2, weights, ids, add=add, tiles=tiles)
        assert got.shape == (t, d) and got.dtype == dtype
        assert _rel(got, ref) < (1e-6 if dtype == torch.float32 else 2e-3)


@needs_triton
@pytest.mark.parametrize(("k_in", "preload"), [(40, 1), (300, 0), (300, 3)])
def test_gated_linear_is_silu_and_mul_then_linear(monkeypatch, k_in: int, preload: int) -> None:
    """silu(gate) * up inside the GEMV: the same values as the two launches, bit for bit."""
    from kernels import _dispatch
    from kernels.activation import silu_and_mul
    from kernels.gemv import gated_linear, linear
    from kernels.triton_impl.gemv import GemvTiles, gemv_triton

    monkeypatch.setattr(_dispatch, "PDL_PRELOAD", preload)
    gate_up = torch.randn(1, 2 * k_in, dtype=torch.float16) * 3
    w = (torch.randn(29, k_in) / k_in**0.5).half()
    b = torch.randn(29).half()
    two = linear(silu_and_mul(gate_up, impl="triton"), w, b, impl="triton")
    assert torch.equal(gated_linear(gate_up, w, b, impl="triton"), two)
    assert torch.equal(gemv_triton(gate_up, w, b, GemvTiles(4, 64, 2), gated=True), two)
    ref = torch.nn.functional.silu(gate_up[:, :k_in].float()) * gate_up[:, k_in:].float()
    torch.testing.assert_close(two.float(), ref @ w.float().T + b.float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(AssertionError):
        gemv_triton(gate_up[:, :-2], w, b, gated=True)


@needs_triton
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gated_linear_add_rounds_once(m: int, with_bias: bool) -> None:
    """`add` (the residual the deferred shared down projection writes into): added to the fp32
    sums in the GEMV and rounded once, as torch.addmm does; a strided add is read as such."""
    from kernels.activation import silu_and_mul
    from kernels.gemv import gated_linear
    from kernels.triton_impl.gemv import GemvTiles, gemv_triton

    k_in, n = 200, 37
    gate_up = torch.randn(m, 2 * k_in, dtype=torch.float16) * 3
    w = (torch.randn(n, k_in) / k_in**0.5).half()
    b = torch.randn(n).half() if with_bias else None
    base = torch.randn(m, 2 * n, dtype=torch.float16) * 4
    add = base[:, ::2] if m > 1 else base[:, :n]  # row stride 2n; m > 1: columns strided too
    act = silu_and_mul(gate_up, impl="torch").double()
    exact = act @ w.double().T + add.double() + (0 if b is None else b.double())
    if m > 1:  # column-strided: the GEMV takes contiguous columns only
        with pytest.raises(AssertionError):
            gemv_triton(gate_up, w, b, gated=True, add=add)
        add = add.contiguous()
    got = gemv_triton(gate_up, w, b, GemvTiles(4, 64, 2), gated=True, add=add)
    assert got.shape == (m, n) and got.dtype == torch.float16
    # one rounding of a nearly exact sum: within half an ulp of fp16 (plus the fp32 sums')
    ulp = torch.finfo(torch.float16).eps * exact.abs().clamp_min(2**-14)
    assert bool(((got.double() - exact).abs() <= 0.5 * ulp + 1e-4).all())
    # the dispatching entry point: the GEMV at one row, addmm above GEMV_MAX_M
    via = gated_linear(gate_up, w, b, impl="triton", add=add)
    assert _rel(via, exact) < 2e-3
    if m == 1:
        assert torch.equal(via, gemv_triton(gate_up, w, b, gated=True, add=add))
    with pytest.raises(AssertionError):
        gated_linear(gate_up, w, b, impl="triton", add=add[:, :-1])


@needs_triton
@pytest.mark.parametrize("shared", [False, True])
def test_moe_down_preload_is_bit_identical(shared: bool) -> None:
    """The down launch reading its first experts' first chunk before the wait: same sums."""
    from kernels.triton_impl.gemv import MoeDecodeTiles, fused_moe_decode

    e, k, d, i, t = 7, 3, 96, 40, 2  # I = 40: chunks of 16 leave a ragged tail
    x = torch.randn(t, d, dtype=torch.float16)
    w13 = (torch.randn(e, 2 * i, d) / d**0.5).half()
    w2 = (torch.randn(e, d, i) / i**0.5).half()
    sh = ((torch.randn(48, d) / d**0.5).half(), (torch.randn(d, 24) / 24**0.5).half())
    sh = sh if shared else ()
    weights, ids = route(torch.randn(t, e), k)
    outs = []
    for p in (0, 1, 2, 5):  # 5: capped at 2
        tiles = MoeDecodeTiles(16, 32, 8, 16, 2, down_preload=p)
        outs.append(fused_moe_decode(x, w13, w2, weights, ids, tiles=tiles, shared=sh or None))
    for got in outs[1:]:
        assert torch.equal(got, outs[0])
    if not shared:
        assert _rel(outs[0], fused_moe_ref(x, w13, w2, weights, ids)) < 2e-3


@needs_triton
@pytest.mark.parametrize(("t", "i_s"), [(1, 24), (3, 56), (4, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_decode_with_shared_experts_in_the_launches(
    t: int, i_s: int, dtype: torch.dtype
) -> None:
    """The shared experts' gated MLP (its own intermediate size) inside the two decode
    launches equals the routed sum plus a separate gated MLP."""
    from kernels.triton_impl.gemv import MoeDecodeTiles, fused_moe_decode

    e, k, d, i = 7, 3, 96, 40
    x = torch.randn(t, d, dtype=dtype)
    w13 = (torch.randn(e, 2 * i, d) / d**0.5).to(dtype)
    w2 = (torch.randn(e, d, i) / i**0.5).to(dtype)
    ws13 = (torch.randn(2 * i_s, d) / d**0.5).to(dtype)
    ws2 = (torch.randn(d, i_s) / i_s**0.5).to(dtype)
    weights, ids = route(torch.randn(t, e), k)
    xf = x.float()
    gate, up = (xf @ ws13.float().t()).split(i_s, dim=-1)
    shared = (torch.nn.functional.silu(gate) * up) @ ws2.float().t()
    ref = fused_moe_ref(x, w13, w2, weights, ids).float() + shared
    for tiles in (None, MoeDecodeTiles(16, 32, 8, 16, 2)):
        got = fused_moe_decode(x, w13, w2, weights, ids, tiles=tiles, shared=(ws13, ws2))
        assert got.shape == (t, d) and got.dtype == dtype
        assert _rel(got, ref.to(dtype)) < (1e-6 if dtype == torch.float32 else 2e-3)
    with pytest.raises(AssertionError, match="no add"):
        fused_moe_decode(x, w13, w2, weights, ids, add=x, shared=(ws13, ws2))


@needs_triton
@pytest.mark.parametrize(("t", "shared"), [(1, False), (3, True), (4, False)])
def test_moe_up_as_dots_matches_the_fma_loop(
    monkeypatch: pytest.MonkeyPatch, t: int, shared: bool
) -> None:
    """`MOE_UP_DOT`: the up launch as tensor-core dots (ragged N and K tails, several K
    chunks, the shared experts' rows in the launch) gives the FMA loop's output up to the
    summation order, for 16-bit weights; fp32 weights keep the FMA loop, bit for bit. (bf16
    dots run in the interpreter since `kernels.triton_impl._interpreter` widens them; on the
    GPU bench/decode_dot_bench.py and the step's logits in bench/decode_step_bench.py.)"""
    import kernels.triton_impl.gemv as gemv_impl
    from kernels.triton_impl.gemv import MoeDecodeTiles, fused_moe_decode

    class Spy:  # counts the dot kernel's launches
        def __init__(self, kernel) -> None:
            self.kernel, self.launches = kernel, 0

        def __getitem__(self, grid):
            self.launches += 1
            return self.kernel[grid]

    spy = Spy(gemv_impl._moe_up_dot_kernel)
    monkeypatch.setattr(gemv_impl, "_moe_up_dot_kernel", spy)
    monkeypatch.setattr(gemv_impl, "UP_DOT_MIN_TOKENS", 1)  # by default from 2 tokens
    e, k, d, i, i_s = 7, 3, 100, 40, 24  # N tails of 40 and 24 in 16s, K of 100 in 32s
    tiles = MoeDecodeTiles(16, 32, 8, 16, 2, up_dot=(16, 32, 2, 1))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(t, d, dtype=dtype)
        w13 = (torch.randn(e, 2 * i, d) / d**0.5).to(dtype)
        w2 = (torch.randn(e, d, i) / i**0.5).to(dtype)
        ws13 = (torch.randn(2 * i_s, d) / d**0.5).to(dtype)
        sh = (ws13, (torch.randn(d, i_s) / i_s**0.5).to(dtype)) if shared else None
        weights, ids = route(torch.randn(t, e), k)
        outs = []
        spy.launches = 0
        for dot in (False, True):
            monkeypatch.setattr(gemv_impl, "MOE_UP_DOT", dot)
            outs.append(fused_moe_decode(x, w13, w2, weights, ids, tiles=tiles, shared=sh))
        if dtype == torch.float32:
            assert torch.equal(outs[0], outs[1]) and spy.launches == 0  # 16-bit only
        else:
            assert spy.launches == 1
            # bf16: 8 significant bits, and the interpreter's casts to it truncate
            tol = 2e-3 if dtype == torch.float16 else 3e-2
            assert _rel(outs[1], outs[0]) < tol, dtype
            if not shared:
                assert _rel(outs[1], fused_moe_ref(x, w13, w2, weights, ids)) < tol, dtype


@needs_triton
def test_moe_up_as_dots_only_from_two_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """One token keeps the FMA up launch (the dots lose there, bench/RESULTS.md)."""
    import kernels.triton_impl.gemv as gemv_impl
    from kernels.triton_impl.gemv import MoeDecodeTiles, fused_moe_decode

    taken = []

    class Grids:  # records the dot kernel's launch grids, launches nothing
        def __getitem__(self, grid):
            taken.append(grid)

    monkeypatch.setattr(gemv_impl, "_moe_up_dot_kernel", Grids())
    e, k, d, i = 5, 2, 32, 16
    tiles = MoeDecodeTiles(16, 32, 8, 16, 2, up_dot=(16, 32, 2, 1))
    w13, w2 = torch.randn(e, 2 * i, d).half(), torch.randn(e, d, i).half()
    weights, ids = route(torch.randn(1, e), k)
    fused_moe_decode(torch.randn(1, d).half(), w13, w2, weights, ids, tiles=tiles)
    assert taken == []
    weights, ids = route(torch.randn(2, e), k)
    with pytest.raises(TypeError):  # the stand-in returns None for the launch
        fused_moe_decode(torch.randn(2, d).half(), w13, w2, weights, ids, tiles=tiles)
    assert taken == [(2 * k * 1,)]


@needs_triton
def test_fused_moe_takes_decode_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = moe_impl.fused_moe_decode

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(a[0].shape[0])
        return real(*a, **kw)

    monkeypatch.setattr(moe_impl, "fused_moe_decode", spy)
    monkeypatch.setattr(moe_impl, "DECODE_MAX_TOKENS", 2)
    e, k, d, i = 6, 2, 32, 16
    w13, w2 = torch.randn(e, 2 * i, d) / 6, torch.randn(e, d, i) / 4
    for t in (1, 2, 3):
        x = torch.randn(t, d)
        weights, ids = route(torch.randn(t, e), k)
        got = fused_moe(x, w13, w2, weights, ids, impl="triton")
        assert _rel(got, fused_moe_ref(x, w13, w2, weights, ids)) < 1e-5
    assert calls == [1, 2]


@needs_triton
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("heads", [(4, 2), (3, 1)])
def test_qkv_rope_matches_linear_then_rotary(
    m: int, dtype: torch.dtype, with_bias: bool, heads: tuple[int, int]
) -> None:
    """One launch = linear, then rotary of q/k by the step table, then k/v into the cache."""
    from engine.layers.rotary import TextRotary
    from kernels.gemv import qkv_rope_linear
    from kernels.triton_impl.gemv import GemvTiles, qkv_rope_triton

    hq, hkv = heads
    d, k_in, blocks, bs = 16, 72, 5, 4
    n = (hq + 2 * hkv) * d
    x = torch.randn(m, k_in, dtype=dtype)
    w = torch.randn(n, k_in, dtype=dtype) / k_in**0.5
    b = torch.randn(n, dtype=dtype) if with_bias else None
    rot = TextRotary(d, 10000.0, (2, 2, 4))
    pos = torch.tensor([[7, 30, 2], [5, 31, 2], [9, 29, 2]])[:, :m]  # [3, M] t, h, w
    table, rows = rot.step_table(pos)
    slots = torch.tensor([3, -1, 17])[:m]  # the middle token is padding: no cache write

    def caches() -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        kc = torch.randn(blocks, bs, hkv, d, generator=g).to(dtype)
        return kc, torch.randn(blocks, bs, hkv, d, generator=g).to(dtype)

    kc_ref, vc_ref = caches()
    ref = qkv_rope_linear(x, w, b, hq, hkv, (table, rows), (kc_ref, vc_ref, slots), impl="torch")
    for tiles in (None, GemvTiles(4, 32, 2), GemvTiles(8, 128, 4)):
        kc, vc = caches()
        got = qkv_rope_triton(x, w, b, hq, hkv, table, rows, kc, vc, slots, tiles)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
        torch.testing.assert_close(kc, kc_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(vc, vc_ref, rtol=tol, atol=tol)
        untouched = torch.ones(blocks * bs, dtype=torch.bool)
        untouched[slots[slots >= 0]] = False
        assert torch.equal(kc.view(-1, hkv, d)[untouched], caches()[0].view(-1, hkv, d)[untouched])
    # the reference itself: q/k really rotated (differs from the plain projection), v not
    plain = F.linear(x, w, b)
    assert not torch.allclose(ref[:, : hq * d], plain[:, : hq * d], atol=1e-3)
    torch.testing.assert_close(ref[:, (hq + hkv) * d :], plain[:, (hq + hkv) * d :])
    # the public entry takes the kernel for one row when triton is asked for
    if m == 1:
        kc, vc = caches()
        got = qkv_rope_linear(x, w, b, hq, hkv, (table, rows), (kc, vc, slots), impl="triton")
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
        torch.testing.assert_close(kc, kc_ref, rtol=tol, atol=tol)


@needs_triton
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_in_the_qkv_launch_is_bit_identical(monkeypatch, m: int, with_residual: bool) -> None:
    """The layer's input norm inside the qkv launch equals the norm launch then the qkv
    launch, bit for bit: qkv, the cache rows and the residual stream out. The public entry
    takes the fused launch at one row with triton, and only there."""
    from engine.layers.rotary import TextRotary
    from kernels.gemv import norm_qkv_rope_linear, qkv_rope_linear
    from kernels.rms_norm import rms_norm
    from kernels.triton_impl.gemv import GemvTiles, qkv_rope_triton

    hq, hkv, d, k_in, bs = 3, 1, 16, 72, 4  # K = 72: a ragged last chunk and norm block
    n = (hq + 2 * hkv) * d
    h = torch.randn(m, k_in, dtype=torch.float16) * 3
    res = torch.randn(m, k_in, dtype=torch.float16) if with_residual else None
    nw = (torch.rand(k_in) + 0.5).half()
    w = (torch.randn(n, k_in) / k_in**0.5).half()
    b = torch.randn(n).half()
    rope = TextRotary(d, 10000.0, (2, 2, 4)).step_table(
        torch.tensor([[7, 30, 2], [5, 31, 2], [9, 29, 2]])[:, :m]
    )
    slots = torch.tensor([3, -1, 17])[:m]

    def caches() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(5, bs, hkv, d).half(), torch.zeros(5, bs, hkv, d).half()

    x, want_res = rms_norm(h, nw, 1e-5, res, impl="triton")
    for tiles in (None, GemvTiles(4, 32, 2)):  # each its own GEMV sum order
        kc_ref, vc_ref = caches()
        want = qkv_rope_triton(x, w, b, hq, hkv, *rope, kc_ref, vc_ref, slots, tiles)
        kc, vc = caches()
        res_out = h if res is None else torch.empty_like(h)
        got = qkv_rope_triton(
            h, w, b, hq, hkv, *rope, kc, vc, slots, tiles, norm=(res, nw, 1e-5, res_out)
        )
        assert torch.equal(got, want) and torch.equal(res_out, want_res)
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref) and kc.abs().sum() > 0
    if res is not None:  # program 0 stores res_out while the others read h and residual
        for alias in (h, res):
            with pytest.raises(AssertionError, match="alias"):
                norm = (res, nw, 1e-5, alias)
                qkv_rope_triton(h, w, b, hq, hkv, *rope, *caches(), slots, norm=norm)
    # the public entry: fused at one row with triton, else the norm then qkv_rope_linear
    fused_calls = _fused_norm_calls(monkeypatch, "qkv_rope_triton")
    for impl in ("triton", "torch"):
        kc, vc = caches()
        fused_calls.clear()
        got, got_res = norm_qkv_rope_linear(
            h, res, nw, 1e-5, w, b, hq, hkv, rope, (kc, vc, slots), impl=impl
        )
        assert (True in fused_calls) == (impl == "triton" and m == 1), fused_calls
        x_i, res_i = rms_norm(h, nw, 1e-5, res, impl=impl)
        kc_i, vc_i = caches()
        want_i = qkv_rope_linear(x_i, w, b, hq, hkv, rope, (kc_i, vc_i, slots), impl=impl)
        assert torch.equal(got, want_i) and torch.equal(got_res, res_i) and torch.equal(kc, kc_i)
        assert (got_res is h) == (res is None)


@needs_triton
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_in_a_gemv_launch_is_bit_identical(monkeypatch, m: int, with_residual: bool) -> None:
    """`norm_linear` (the shared experts' norm and gate_up on the side stream): the norm
    inside the GEMV launch equals the norm launch then the GEMV, bit for bit, output and
    residual stream out; the public entry fuses at one row with triton, and only there."""
    from kernels.gemv import norm_linear
    from kernels.rms_norm import rms_norm
    from kernels.triton_impl.gemv import GemvTiles, gemv_triton

    n, k_in = 37, 72  # ragged row tiles, a ragged last chunk and norm block
    h = torch.randn(m, k_in, dtype=torch.float16) * 3
    res = torch.randn(m, k_in, dtype=torch.float16) if with_residual else None
    nw = (torch.rand(k_in) + 0.5).half()
    w = (torch.randn(n, k_in) / k_in**0.5).half()
    x, want_res = rms_norm(h, nw, 1e-5, res, impl="triton")
    for tiles in (None, GemvTiles(4, 32, 2), GemvTiles(8, 64, 4)):  # their own sum orders
        want = gemv_triton(x, w, None, tiles)
        res_out = h if res is None else torch.empty_like(h)
        got = gemv_triton(h, w, None, tiles, norm=(res, nw, 1e-5, res_out))
        assert torch.equal(got, want) and torch.equal(res_out, want_res)
    if res is not None:  # program 0 stores res_out while the others read h and residual
        for alias in (h, res):
            with pytest.raises(AssertionError, match="alias"):
                gemv_triton(h, w, norm=(res, nw, 1e-5, alias))
    with pytest.raises(AssertionError, match="plain GEMV"):
        gemv_triton(torch.cat([h, h], 1), w, gated=True, norm=(res, nw, 1e-5, torch.empty_like(h)))
    fused_calls = _fused_norm_calls(monkeypatch, "gemv_triton")
    for impl in ("triton", "torch"):
        fused_calls.clear()
        got, got_res = norm_linear(h, res, nw, 1e-5, w, impl=impl)
        assert (True in fused_calls) == (impl == "triton" and m == 1), fused_calls
        x_i, res_i = rms_norm(h, nw, 1e-5, res, impl=impl)
        want_i = linear(x_i, w, impl=impl)
        assert torch.equal(got, want_i) and torch.equal(got_res, res_i)
        assert (got_res is h) == (res is None)


@needs_triton
@pytest.mark.parametrize("m", [1, 3])
def test_qkv_rope_early_meta_is_bit_identical(monkeypatch, m: int) -> None:
    """Positions, cos|sin rows and slots read before the PDL wait (QKV_EARLY_META) or after
    the sums: the same output and the same cache, bit for bit."""
    import kernels.triton_impl.gemv as gemv_impl
    from engine.layers.rotary import TextRotary

    hq, hkv, d, k_in, bs = 3, 1, 16, 72, 4
    n = (hq + 2 * hkv) * d
    x = torch.randn(m, k_in, dtype=torch.float16)
    w = (torch.randn(n, k_in) / k_in**0.5).half()
    table, rows = TextRotary(d, 10000.0, (2, 2, 4)).step_table(
        torch.tensor([[7, 30, 2], [5, 31, 2], [9, 29, 2]])[:, :m]
    )
    slots = torch.tensor([3, -1, 17])[:m]
    outs = []
    for early in (False, True):
        monkeypatch.setattr(gemv_impl, "QKV_EARLY_META", early)
        kc, vc = torch.zeros(5, bs, hkv, d).half(), torch.zeros(5, bs, hkv, d).half()
        y = gemv_impl.qkv_rope_triton(x, w, None, hq, hkv, table, rows, kc, vc, slots)
        outs.append((y, kc, vc))
    for late, early in zip(*outs, strict=True):
        assert torch.equal(late, early)
    assert outs[1][1].abs().sum() > 0  # the cache was written


@needs_triton
@pytest.mark.parametrize("k_in", [200, 1024, 3000])
def test_weight_preload_is_bit_identical(monkeypatch, k_in: int) -> None:
    """The first 0-4 weight chunks read before the PDL wait: same products, same order."""
    from kernels import _dispatch
    from kernels.moe import gate_route
    from kernels.triton_impl import moe_routing
    from kernels.triton_impl.gemv import GemvTiles, gemv_triton

    x = torch.randn(1, k_in, dtype=torch.float16)
    w = torch.randn(37, k_in, dtype=torch.float16) / k_in**0.5
    router = torch.randn(12, k_in) / k_in**0.5
    out = {}
    for preload in range(5):  # 3000 columns are 6 chunks of 512 (the router: 3 of 1024)
        monkeypatch.setattr(_dispatch, "PDL_PRELOAD", preload)
        monkeypatch.setattr(moe_routing, "ROUTER_PRELOAD", preload)  # the router's own depth
        y = gemv_triton(x, w, None, GemvTiles(4, 512, 2))
        rw, rid = gate_route(x, router, 3, None, impl="triton")
        out[preload] = (y, rw, rid)
    for preload in range(1, 5):
        for a, b in zip(out[0], out[preload], strict=True):
            assert torch.equal(a, b), preload
    torch.testing.assert_close(out[4][0].float(), (x.float() @ w.float().T), rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_norm_in_the_gate_up_launch_is_bit_identical_on_gpu(monkeypatch) -> None:
    """At the 28B shared experts' gate_up (6144 x 2560, bf16, one row) on the GPU, where the
    row's sum of squares is reduced by real warps: the fused launch equals the norm launch
    then the GEMV, bit for bit."""
    from kernels.gemv import norm_linear
    from kernels.rms_norm import rms_norm

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    h, res = (torch.randn(1, 2560, device=dev, generator=g).bfloat16() * 4 for _ in range(2))
    nw = (torch.rand(2560, device=dev, generator=g) + 0.5).bfloat16()
    w = (torch.randn(6144, 2560, device=dev, generator=g) * 0.02).bfloat16()
    fused_calls = _fused_norm_calls(monkeypatch, "gemv_triton")
    got, got_res = norm_linear(h, res, nw, 1e-5, w)
    assert fused_calls and fused_calls[0]  # the fused launch ran
    x, want_res = rms_norm(h, nw, 1e-5, res)
    assert torch.equal(got_res, want_res) and torch.equal(got, linear(x, w))
