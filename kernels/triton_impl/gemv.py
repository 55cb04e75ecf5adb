"""Small-M linear (decode GEMV) and the decode MoE expert GEMVs, as weight streams.

At decode a step multiplies 1-4 activation rows by every weight matrix once, so each layer is
a pass over its weights. cuBLAS picks GEMM tiles for these and reaches ~1.9 TB/s on an H100;
the Triton grouped MoE GEMM pads each expert's single row to a 16-row dot tile and has only
144-240 programs for 132 SMs. Here each program owns a few weight rows (BLOCK_N) and streams
them across K in BLOCK_K chunks with fp32 FMAs (no tensor cores: M is 1-4), reducing once at
the end, so thousands of small programs keep the memory system busy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import _dispatch
from kernels._dispatch import next_pow2, use_pdl
from kernels.triton_impl.pdl import pdl_enter, pdl_launch, pdl_wait
from kernels.triton_impl.rms_norm import add_residual, rms_apply, rms_rstd


@dataclass(frozen=True)
class GemvTiles:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    preload: int | None = None  # cap on _dispatch.PDL_PRELOAD (weight chunks before the wait)
    depth: int | None = None  # chunks before the wait instead of PDL_PRELOAD (then capped)


# (M, N, K) -> tiles where measured better than the heuristic; else the heuristic. 28B shapes,
# in the full b1 step on the H200, graph replay (bench/decode_step_bench.py, bench/RESULTS.md,
# 2026-12-03): qkv 3584 x 2560 at 4 x 512 (896 programs, one wave) -0.072 / -0.078 ms against
# 2 x 1024 (1792 programs); the shared experts' gate_up 6144 x 2560 at 4 x 512 -0.035 against
# 8 x 512 (o_proj 2560 x 2560 loses at 4 x 512: +0.010). The shared down 2560 x 3072 lost at
# 4 x 512 beside the routed up launch (+0.002 to +0.095); since it runs beside the routed down
# launch (engine.layers.moe.SHARED_DOWN_DEFERRED, session 7) it gains there: -0.016 / -0.013 /
# -0.008 ms in three calls.
GEMV_TILES: dict[tuple[int, int, int], GemvTiles] = {
    (1, 3584, 2560): GemvTiles(4, 512, 4, 3),
    (1, 6144, 2560): GemvTiles(4, 512, 4, 3),
    (1, 2560, 3072): GemvTiles(4, 512, 4, 3),
}


QKV_EARLY_META = True
"""The qkv + rotary launch reads its positions, cos|sin rows and cache slots before its PDL
wait instead of after its sums (one round trip off each program's tail; bit-identical). Read
at trace time."""


def pick_gemv_tiles(n: int, k: int) -> GemvTiles:
    """From the M=1 sweeps at the 28B decode shapes on an H100 (bench/RESULTS.md, 2026-11-25):
    up to ~4k rows, 2 rows x 1024 columns per program (in the full step under programmatic
    dependent launch, qkv and o_proj at 2 rows beat 4: b1 replay -0.075 ms; alone, 4 rows had
    7.3 us for 2560x2560 vs cuBLAS 8.1); above, 8 x 512 (LM head 103424x2560: 179.5 us =
    2.95 TB/s vs cuBLAS 195.2)."""
    if n <= 4096:
        return GemvTiles(2, min(1024, next_pow2(k)), 4, 3)
    # many waves (the LM head: 12.9k programs): only the first wave gains from reading before
    # the wait, and each chunk held costs every wave occupancy (8 x 512: 80 -> 123 registers
    # at 3 chunks)
    return GemvTiles(8, min(512, next_pow2(k)), 4, 3, preload=1)


def gemv_tiles(m: int, n: int, k: int) -> GemvTiles:
    """The tiles a GEMV of m rows by an [n, k] weight launches with."""
    return GEMV_TILES.get((m, n, k)) or pick_gemv_tiles(n, k)


@triton.jit
def _w_chunk(w_rows, k0, mask_n, K, BLOCK_K: tl.constexpr):
    # [BLOCK_N, BLOCK_K] weight columns [k0, k0 + BLOCK_K) of this program's rows
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = mask_n[:, None] & (offs_k < K)[None, :]
    return tl.load(w_rows + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def _fma_chunk(
    acc3, w, x_ptr, k0, offs_m, mask_m, K, stride_xm, BLOCK_K: tl.constexpr, GATED: tl.constexpr,
    res_ptr=None, stride_rm=0, nw_ptr=None, rstd=1.0, NORM: tl.constexpr = False,
    HAS_RESIDUAL: tl.constexpr = False,
):  # fmt: skip
    # acc3 [M_PAD, BLOCK_N, BLOCK_K] += x[:, k0:k0 + BLOCK_K] * w, in fp32. GATED: x is
    # [gate | up] (K columns each) and the input is silu(gate) * up, rounded as
    # kernels.triton_impl.activation's silu_and_mul rounds it. NORM: the input is
    # rms_norm(x (+ res)) * nw with the rows' rstd [M_PAD, 1], rounded as `_rms_norm_kernel`
    # rounds it
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    mask = mask_m[:, None] & (offs_k < K)[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)  # [M_PAD, BLOCK_K]
    if NORM:
        if HAS_RESIDUAL:
            res = tl.load(
                res_ptr + offs_m[:, None] * stride_rm + offs_k[None, :], mask=mask, other=0.0
            )
            x = add_residual(x, res)
        nw = tl.load(nw_ptr + offs_k, mask=offs_k < K, other=0.0)
        x = rms_apply(x, rstd, nw[None, :])
    if GATED:
        up = tl.load(ptrs + K, mask=mask, other=0.0)
        g = x.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(x.dtype).to(tl.float32)
        x = (act * up.to(tl.float32)).to(x.dtype)
    return acc3 + x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]


@triton.jit
def _rows_rstd(
    x_ptr, res_ptr, res_out_ptr, stride_xm, stride_rm, offs_m, eps, D: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # fp32 [M_PAD, 1]: each row's rms rstd of h (+ res), reduced over one [next_pow2(D)] row
    # as `_rms_norm_kernel` reduces it (bit-identical at its warp count); program 0 stores
    # the rows of h + res in res_out
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    rstd = tl.zeros([M_PAD, 1], dtype=tl.float32) + 1.0
    for m in tl.static_range(M):
        h = tl.load(x_ptr + m * stride_xm + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            h = add_residual(h, tl.load(res_ptr + m * stride_rm + offs, mask=mask, other=0.0))
            if tl.program_id(0) == 0:
                tl.store(res_out_ptr + m * D + offs, h, mask=mask)
        rstd = tl.where(offs_m[:, None] == m, rms_rstd(h, eps, D), rstd)
    return rstd


@triton.jit
def _gemv_acc(
    x_ptr,
    w_ptr,
    b_ptr,
    offs_n,
    mask_n,
    offs_m,
    mask_m,
    K,
    stride_xm,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    PRELOAD: tl.constexpr,
    GATED: tl.constexpr,
    res_ptr=None,
    stride_rm=0,
    nw_ptr=None,
    res_out_ptr=None,
    eps=0.0,
    NORM_D: tl.constexpr = 0,
    HAS_RESIDUAL: tl.constexpr = False,
    M: tl.constexpr = 1,
    NORM_BLOCK: tl.constexpr = 1,
):
    # fp32 [M_PAD, BLOCK_N]: sum_k x[m, k] * w[n, k] (+ b[n]) for this program's rows of w.
    # Waits on the previous kernel (PDL) itself: the first PRELOAD (0-4) weight chunks are
    # read before the wait (same products, same order: bit-identical). NORM_D (= K) > 0:
    # x is h and the input rms_norm(h (+ res)) * nw (`_rows_rstd`); program 0 stores the
    # rows of h + res in res_out.
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    acc3 = tl.zeros([M_PAD, BLOCK_N, BLOCK_K], dtype=tl.float32)
    if PRELOAD >= 1:
        w0 = _w_chunk(w_rows, 0, mask_n, K, BLOCK_K)
    if PRELOAD >= 2:
        w1 = _w_chunk(w_rows, BLOCK_K, mask_n, K, BLOCK_K)
    if PRELOAD >= 3:
        w2 = _w_chunk(w_rows, 2 * BLOCK_K, mask_n, K, BLOCK_K)
    if PRELOAD >= 4:
        w3 = _w_chunk(w_rows, 3 * BLOCK_K, mask_n, K, BLOCK_K)
    pdl_wait(PDL)
    NORM: tl.constexpr = NORM_D > 0
    rstd = 1.0
    if NORM:
        rstd = _rows_rstd(
            x_ptr, res_ptr, res_out_ptr, stride_xm, stride_rm, offs_m, eps, NORM_D,
            HAS_RESIDUAL, M, M_PAD, NORM_BLOCK,
        )  # fmt: skip
    if PRELOAD >= 1:
        acc3 = _fma_chunk(acc3, w0, x_ptr, 0, offs_m, mask_m, K, stride_xm, BLOCK_K, GATED,
                          res_ptr, stride_rm, nw_ptr, rstd, NORM, HAS_RESIDUAL)  # fmt: skip
    if PRELOAD >= 2:
        acc3 = _fma_chunk(acc3, w1, x_ptr, BLOCK_K, offs_m, mask_m, K, stride_xm, BLOCK_K, GATED,
                          res_ptr, stride_rm, nw_ptr, rstd, NORM, HAS_RESIDUAL)  # fmt: skip
    if PRELOAD >= 3:
        acc3 = _fma_chunk(acc3, w2, x_ptr, 2 * BLOCK_K, offs_m, mask_m, K, stride_xm, BLOCK_K,
                          GATED, res_ptr, stride_rm, nw_ptr, rstd, NORM, HAS_RESIDUAL)  # fmt: skip
    if PRELOAD >= 4:
        acc3 = _fma_chunk(acc3, w3, x_ptr, 3 * BLOCK_K, offs_m, mask_m, K, stride_xm, BLOCK_K,
                          GATED, res_ptr, stride_rm, nw_ptr, rstd, NORM, HAS_RESIDUAL)  # fmt: skip
    for k0 in range(PRELOAD * BLOCK_K, K, BLOCK_K):  # reduced once, at the end
        w = _w_chunk(w_rows, k0, mask_n, K, BLOCK_K)
        acc3 = _fma_chunk(acc3, w, x_ptr, k0, offs_m, mask_m, K, stride_xm, BLOCK_K, GATED,
                          res_ptr, stride_rm, nw_ptr, rstd, NORM, HAS_RESIDUAL)  # fmt: skip
    acc = tl.sum(acc3, axis=2)  # [M_PAD, BLOCK_N]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    a_ptr,
    y_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_am,
    stride_ym,
    M: tl.constexpr,
    M_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ADD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    PRELOAD: tl.constexpr,
    GATED: tl.constexpr,
    res_ptr,
    nw_ptr,
    res_out_ptr,
    stride_rm,
    eps,
    NORM_D: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NORM_BLOCK: tl.constexpr,
):
    # y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n]) (+ a[m, n], rounded once); one program =
    # BLOCK_N rows of w, all M rows. GATED: x is [gate | up] and the input silu(gate) * up
    # (K columns). NORM_D > 0: x is h and the input rms_norm(h (+ res)) * nw (`_gemv_acc`).
    pdl_launch(PDL)  # the wait is in _gemv_acc
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, M_PAD)
    mask_m = offs_m < M
    acc = _gemv_acc(
        x_ptr, w_ptr, b_ptr, offs_n, mask_n, offs_m, mask_m, K, stride_xm, stride_wn,
        HAS_BIAS, M_PAD, BLOCK_N, BLOCK_K, PDL, PRELOAD, GATED, res_ptr, stride_rm, nw_ptr,
        res_out_ptr, eps, NORM_D, HAS_RESIDUAL, M, NORM_BLOCK,
    )  # fmt: skip
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_ADD:
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_n[None, :], mask=mask, other=0.0)
        acc += a.to(tl.float32)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=mask)


@triton.jit
def _rope_trig(table_ptr, rows_ptr, offs_m, mask_m, pair, trig_mask, D: tl.constexpr):
    # fp32 cos, sin [M_PAD, half]: the frequencies `pair` of row rows[m] of the cos|sin table
    row = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)  # [M_PAD]
    trig = table_ptr + row[:, None] * D + pair[None, :]  # [M_PAD, half]
    return tl.load(trig, mask=trig_mask, other=1.0), tl.load(
        trig + D // 2, mask=trig_mask, other=0.0
    )


@triton.jit
def _qkv_rope_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    table_ptr,
    rows_ptr,
    slot_ptr,
    k_cache_ptr,
    v_cache_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    M: tl.constexpr,
    M_PAD: tl.constexpr,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    PRELOAD: tl.constexpr,
    EARLY_META: tl.constexpr,
    res_ptr,
    nw_ptr,
    res_out_ptr,
    stride_rm,
    eps,
    NORM_D: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NORM_BLOCK: tl.constexpr,
):
    # The qkv projection y = [q | k | v] (as _gemv_kernel), then in registers: the rotary
    # embedding of the q and k columns (interleaved pairs (2j, 2j+1), angles from row
    # rows[m] of the step's cos|sin table) and the rotated k and the v columns written into
    # the paged cache at slot[m] (< 0: skip). BLOCK_N divides D, so a program's columns
    # lie in one head: its pairs are whole and it is all q, all k or all v. NORM_D > 0: x is
    # h and the projection's input the layer's norm rms_norm(h (+ res)) * nw (`_gemv_acc`).
    pdl_launch(PDL)  # the wait is in _gemv_acc
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, M_PAD)
    mask_m = offs_m < M
    # EARLY_META: the positions, the cos|sin rows and the cache slots are read before the
    # wait (in _gemv_acc), not after the sums: host copies and torch's (plain, not PDL)
    # launches write them before the step's first PDL kernel starts (docs/decisions.md)
    half: tl.constexpr = BLOCK_N // 2
    pair = (n0 % D) // 2 + tl.arange(0, half)  # [half] frequency index of each pair
    trig_mask = mask_m[:, None] & (pair < D // 2)[None, :]
    if EARLY_META:
        cos, sin = _rope_trig(table_ptr, rows_ptr, offs_m, mask_m, pair, trig_mask, D)
        slot = tl.load(slot_ptr + offs_m, mask=mask_m, other=-1)  # [M_PAD] int64
    acc = _gemv_acc(
        x_ptr, w_ptr, b_ptr, offs_n, mask_n, offs_m, mask_m, K, stride_xm, stride_wn,
        HAS_BIAS, M_PAD, BLOCK_N, BLOCK_K, PDL, PRELOAD, False, res_ptr, stride_rm, nw_ptr,
        res_out_ptr, eps, NORM_D, HAS_RESIDUAL, M, NORM_BLOCK,
    )  # fmt: skip
    y = acc.to(y_ptr.dtype.element_ty)  # rounded as the linear's output is, then rotated
    a, b = tl.split(tl.reshape(y.to(tl.float32), [M_PAD, half, 2]))  # even, odd columns
    if not EARLY_META:
        cos, sin = _rope_trig(table_ptr, rows_ptr, offs_m, mask_m, pair, trig_mask, D)
    ra = a * cos - b * sin
    rb = b * cos + a * sin
    rot = tl.reshape(tl.join(ra, rb), [M_PAD, BLOCK_N]).to(y_ptr.dtype.element_ty)
    y = tl.where(n0 < (HQ + HKV) * D, rot, y)  # v columns are not rotated
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=mask)
    if n0 >= HQ * D:  # k or v columns: into the cache row of each token's slot
        if not EARLY_META:
            slot = tl.load(slot_ptr + offs_m, mask=mask_m, other=-1)  # [M_PAD] int64
        c = offs_n - HQ * D  # [BLOCK_N] column within [k | v]
        is_v = n0 >= (HQ + HKV) * D
        col = tl.where(is_v, c - HKV * D, c)
        dst = slot[:, None] * (HKV * D) + col[None, :]
        keep = mask & (slot[:, None] >= 0)
        if is_v:
            tl.store(v_cache_ptr + dst, y.to(v_cache_ptr.dtype.element_ty), mask=keep)
        else:
            tl.store(k_cache_ptr + dst, y.to(k_cache_ptr.dtype.element_ty), mask=keep)


def gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tiles: GemvTiles | None = None,
    gated: bool = False,
    add: torch.Tensor | None = None,
    norm: tuple[torch.Tensor | None, torch.Tensor, float, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x ``[M, K]`` with small M; weight ``[N, K]``.
    ``gated``: x is ``[M, 2K]`` = [gate | up] and the input is ``silu_and_mul(x)``. ``add``
    ``[M, N]``: added to the fp32 sums, the result rounded once (as ``torch.addmm``).
    ``norm``: as ``qkv_rope_triton``'s (x is h, the input ``rms_norm(h + residual) * weight``,
    ``h + residual`` stored in res_out)."""
    # M rows, K in, N out
    m, k = x.shape
    k = k // 2 if gated else k
    n, k_w = weight.shape
    assert k_w == k and x.shape[1] == (2 * k if gated else k), (x.shape, weight.shape)
    assert 1 <= m <= 8, x.shape
    assert x.stride(1) == 1 and weight.stride(1) == 1, (x.stride(), weight.stride())
    assert x.dtype == weight.dtype, (x.dtype, weight.dtype)
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous(), bias.shape
    if add is not None:
        assert add.shape == (m, n) and add.stride(1) == 1 and add.dtype == x.dtype, add.shape
    assert norm is None or not gated, "the norm rides only in a plain GEMV"
    residual, norm_weight, eps, res_out = _norm_args(x, norm)
    tiles = tiles or gemv_tiles(m, n, k)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    pdl = use_pdl(x)
    _gemv_kernel[(triton.cdiv(n, tiles.block_n),)](
        x,
        weight,
        weight if bias is None else bias,
        y if add is None else add,
        y,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        y.stride(0) if add is None else add.stride(0),
        y.stride(0),
        M=m,
        M_PAD=next_pow2(m),
        HAS_BIAS=bias is not None,
        HAS_ADD=add is not None,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        PDL=pdl,
        PRELOAD=_dispatch.preload_chunks(k, tiles.block_k, tiles.preload, tiles.depth),
        GATED=gated,
        res_ptr=x if residual is None else residual,
        nw_ptr=norm_weight,
        res_out_ptr=res_out,
        stride_rm=x.stride(0) if residual is None else residual.stride(0),
        eps=eps,
        NORM_D=k if norm is not None else 0,
        HAS_RESIDUAL=residual is not None,
        NORM_BLOCK=next_pow2(k) if norm is not None else 1,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        launch_pdl=pdl,
    )
    return y


def _norm_args(
    x: torch.Tensor, norm: tuple[torch.Tensor | None, torch.Tensor, float, torch.Tensor] | None
) -> tuple[torch.Tensor | None, torch.Tensor, float, torch.Tensor]:
    """A fused norm's (residual, weight, eps, res_out), checked; x stands in where unused."""
    if norm is None:
        return None, x, 0.0, x
    residual, norm_weight, eps, res_out = norm
    k = x.shape[1]
    assert norm_weight.shape == (k,) and norm_weight.is_contiguous(), norm_weight.shape
    assert res_out.shape == x.shape and res_out.is_contiguous(), res_out.shape
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, residual.shape
        assert residual.stride(1) == 1, residual.stride()
        # program 0 stores h + residual while the others still read h and residual
        ptrs = (x.data_ptr(), residual.data_ptr())
        assert res_out.data_ptr() not in ptrs, "res_out must not alias h or residual"
    return residual, norm_weight, eps, res_out


def qkv_rope_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    num_kv_heads: int,
    table: torch.Tensor,
    rows: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    tiles: GemvTiles | None = None,
    norm: tuple[torch.Tensor | None, torch.Tensor, float, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Shapes are checked by ``kernels.gemv.qkv_rope_linear``; returns ``[M, N]``.

    norm = (residual ``[M, K]`` or None, weight ``[K]``, eps, res_out ``[M, K]``): x is h and
    the projection's input ``rms_norm(h + residual) * weight`` (as ``kernels.rms_norm``
    rounds it); ``h + residual`` is stored in res_out."""
    # M rows, K in, N = (Hq + 2 Hkv) D out
    m, k = x.shape
    residual, norm_weight, eps, res_out = _norm_args(x, norm)
    res = x if residual is None else residual
    n = weight.shape[0]
    d = table.shape[1]
    tiles = tiles or gemv_tiles(m, n, k)
    assert d % tiles.block_n == 0 and tiles.block_n % 2 == 0, (d, tiles.block_n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    pdl = use_pdl(x)
    _qkv_rope_kernel[(triton.cdiv(n, tiles.block_n),)](
        x,
        weight,
        weight if bias is None else bias,
        y,
        table,
        rows,
        slot_mapping,
        k_cache,
        v_cache,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        M=m,
        M_PAD=next_pow2(m),
        HQ=num_heads,
        HKV=num_kv_heads,
        D=d,
        HAS_BIAS=bias is not None,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        PDL=pdl,
        PRELOAD=_dispatch.preload_chunks(k, tiles.block_k, tiles.preload, tiles.depth),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        EARLY_META=QKV_EARLY_META,
        res_ptr=res,
        nw_ptr=norm_weight,
        res_out_ptr=res_out,
        stride_rm=res.stride(0),
        eps=eps,
        NORM_D=k if norm is not None else 0,
        HAS_RESIDUAL=residual is not None,
        NORM_BLOCK=next_pow2(k) if norm is not None else 1,
        launch_pdl=pdl,
    )
    return y


# ---------------------------------------------------------------------------------------------
# Decode MoE: one GEMV per (token, slot) for gate/up, one per token over its k slots for down.


@dataclass(frozen=True)
class MoeDecodeTiles:
    up_block_n: int = 4  # intermediate columns per program (gate and up rows each)
    up_block_k: int = 512
    down_block_n: int = 2  # hidden columns per program
    down_block_k: int = 512
    num_warps: int = 2
    num_stages: int = 3
    # under PDL, the down launch reads the first K chunk of its first `down_preload` (0-2)
    # routed experts before waiting on the up launch; the up launch then lets it be scheduled
    # only after its own wait (so the router's expert ids are complete when they are read)
    down_preload: int = 1
    # the down launch's warps (None: num_warps). H200, b1 / b4 replay, 2 columns of 1 warp
    # against 4 of 2: -0.017 / -0.025, -0.029 / -0.033, -0.019 / -0.026 ms in three calls
    down_num_warps: int | None = 1
    # the up launch as dots (`MOE_UP_DOT`): (columns, K chunk, stages, warps) a program.
    # H200, one 28B up launch alone, cold weights: 16 x 128, 3 stages, 1 warp 24.8 us
    # (3.8 TB/s) against 30.7 us for the FMA loop's 4 x 512 at 2 warps
    up_dot: tuple[int, int, int, int] = (16, 128, 3, 1)


# 28B shapes, H100 (bench/RESULTS.md, 2026-11-25 session 2): 2 warps beat 4 at T=1/2/4
# (0.059-0.061 vs 0.069-0.077 ms/layer at T=1) and, unlike 4 warps, the grouped GEMM at T=2/4.
# Full decode step, graph replay: b1 3.76 -> 3.61 ms (same logits); b2 -0.28, b4 -0.10 ms
# with DECODE_MAX_TOKENS = 4 (4 warps there would cost +0.17 / +0.40 ms).
MOE_DECODE_TILES = MoeDecodeTiles()

MOE_UP_DOT = True
"""The decode MoE up launch as tensor-core dots with pipelined weight loads
(`_moe_up_dot_kernel`, tiles `MoeDecodeTiles.up_dot`) instead of FMA loops, for 16-bit
weights and at least `UP_DOT_MIN_TOKENS` tokens. Read at trace time. H200, 28B step
replayed (bench/RESULTS.md, 2026-12-04): b4 -0.149 ms (-2.9%); b1 +0.11 to +0.24 (the
576 programs of one token's launch, beside the shared experts' GEMVs on the side stream,
stream slower than the FMA launch's 2304)."""
UP_DOT_MIN_TOKENS = 2

UP_DOT_LAUNCH_AT_END = True
"""With `MOE_UP_DOT` under PDL: the down launch is let in as the up programs end their sums,
not after their wait (the dot launch has a quarter of the FMA launch's programs, so all of
them start early and the down launch would sit resident, reading ahead, beside it)."""

UP_PDL_BESIDE = True
"""With ``add`` being computed on a side stream (``add_stream``: the shared experts), the up
launch is still launched under PDL. That pays only because the router lets it in late
(``moe_routing.LATE_LAUNCH``): resident from the router's start, its ~10 programs a SM took
the SM slots the side stream's kernels (forked there) need, and the shared experts ran after
the up launch instead of beside the router. H200, b1 replay (bench/RESULTS.md, 2026-12-03):
early PDL +0.135 ms against plain; late PDL -0.012 against plain. False: launched plainly."""


@triton.jit
def _up_enter(PDL: tl.constexpr, LAUNCH_AFTER_WAIT: tl.constexpr, LAUNCH_AT_END: tl.constexpr):
    # LAUNCH_AFTER_WAIT: the down launch reads expert ids before its own wait, so it may be
    # scheduled only once every program here has seen the router complete. LAUNCH_AT_END:
    # only as the programs finish their sums (the dot launch lets it in itself).
    if LAUNCH_AT_END:
        pdl_wait(PDL)
    elif LAUNCH_AFTER_WAIT:
        pdl_wait(PDL)
        pdl_launch(PDL)
    else:
        pdl_enter(PDL)


@triton.jit
def _up_target(
    pid, ids_ptr, w_ptr, h_ptr, ws_ptr, hs_ptr, I, IS, n_shared, stride_we, stride_wn,
    stride_wsn, TOPK: tl.constexpr, NB_I: tl.constexpr, NB_S: tl.constexpr,
    HAS_SHARED: tl.constexpr,
):  # fmt: skip
    # (token, column block, [gate; up] weight base, intermediate size, weight row stride,
    # output row) of up program pid: the first n_shared programs serve the shared experts
    if HAS_SHARED and pid < n_shared:
        t = pid // NB_S
        cb = pid % NB_S
        base = ws_ptr
        inter = IS
        stride_n = stride_wsn
        h_row = hs_ptr + t.to(tl.int64) * IS
    else:
        q = pid - n_shared
        r = q // NB_I
        cb = q % NB_I
        t = r // TOPK
        e = tl.load(ids_ptr + r).to(tl.int64)
        base = w_ptr + e * stride_we
        inter = I
        stride_n = stride_wn
        h_row = h_ptr + r.to(tl.int64) * I
    return t, cb, base, inter, stride_n, h_row


@triton.jit
def _gated_store(gate, up, h_row, offs_n, mask_n):
    # h = silu(gate) * up, gate and up rounded to the activation dtype first, as the unfused
    # linear outputs are
    gate = gate.to(h_row.dtype.element_ty).to(tl.float32)
    up = up.to(h_row.dtype.element_ty).to(tl.float32)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_row + offs_n, h.to(h_row.dtype.element_ty), mask=mask_n)


@triton.jit
def _moe_up_kernel(
    x_ptr,
    w_ptr,
    ids_ptr,
    h_ptr,
    ws_ptr,
    hs_ptr,
    I,
    IS,
    D,
    n_shared,
    stride_xt,
    stride_we,
    stride_wn,
    stride_wsn,
    TOPK: tl.constexpr,
    NB_I: tl.constexpr,
    NB_S: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    LAUNCH_AFTER_WAIT: tl.constexpr,
):
    # h[r] = silu(w13[e][:I] @ x[t]) * (w13[e][I:] @ x[t]), r = t * TOPK + j, e = ids[r];
    # the first n_shared programs do the same for the shared experts' [gate; up] rows
    # (intermediate IS) into hs[t]. 1-D grid: (row, column block) pairs.
    _up_enter(PDL, LAUNCH_AFTER_WAIT, False)
    t, cb, base, inter, stride_n, h_row = _up_target(
        tl.program_id(0), ids_ptr, w_ptr, h_ptr, ws_ptr, hs_ptr, I, IS, n_shared, stride_we,
        stride_wn, stride_wsn, TOPK, NB_I, NB_S, HAS_SHARED,
    )  # fmt: skip
    offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < inter
    g_rows = base + offs_n.to(tl.int64)[:, None] * stride_n
    u_rows = g_rows + inter * stride_n
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        xk = tl.load(x_ptr + t * stride_xt + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        wmask = mask_n[:, None] & mask_k[None, :]
        wg = tl.load(g_rows + offs_k[None, :], mask=wmask, other=0.0)
        wu = tl.load(u_rows + offs_k[None, :], mask=wmask, other=0.0)
        acc_g += wg.to(tl.float32) * xk[None, :]
        acc_u += wu.to(tl.float32) * xk[None, :]
    _gated_store(tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1), h_row, offs_n, mask_n)


@triton.jit
def _moe_up_dot_kernel(
    x_ptr,
    w_ptr,
    ids_ptr,
    h_ptr,
    ws_ptr,
    hs_ptr,
    I,
    IS,
    D,
    n_shared,
    stride_xt,
    stride_we,
    stride_wn,
    stride_wsn,
    TOPK: tl.constexpr,
    NB_I: tl.constexpr,
    NB_S: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    PDL: tl.constexpr,
    LAUNCH_AFTER_WAIT: tl.constexpr,
    LAUNCH_AT_END: tl.constexpr = False,
):
    # `_moe_up_kernel`'s contract, the sums as tensor-core dots: the token's row is row 0 of
    # a [16, BLOCK_K] operand (the rest zero), the weight chunk a [BLOCK_K, BLOCK_N] operand,
    # fp32 accumulation. Triton's pipeliner keeps STAGES - 1 chunks of every program in
    # flight through shared memory, which it does not do for loads feeding FMAs: more bytes
    # in flight a SM, closer to the copy rate (Little's law). Another summation order than
    # the FMA loop's (both fp32), so not bit-identical to it.
    _up_enter(PDL, LAUNCH_AFTER_WAIT, LAUNCH_AT_END)
    t, cb, base, inter, stride_n, h_row = _up_target(
        tl.program_id(0), ids_ptr, w_ptr, h_ptr, ws_ptr, hs_ptr, I, IS, n_shared, stride_we,
        stride_wn, stride_wsn, TOPK, NB_I, NB_S, HAS_SHARED,
    )  # fmt: skip
    offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < inter
    offs_m = tl.arange(0, 16)
    row0 = offs_m[:, None] == 0  # [16, 1]
    g_cols = base + offs_n.to(tl.int64)[None, :] * stride_n  # [1, BLOCK_N]
    u_cols = g_cols + inter * stride_n
    x_row = x_ptr + t * stride_xt + offs_m[:, None] * 0  # [16, 1], every row the token's
    acc_g = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, D, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        xk = tl.load(x_row + offs_k[None, :], mask=row0 & mask_k[None, :], other=0.0)
        wmask = mask_k[:, None] & mask_n[None, :]
        wg = tl.load(g_cols + offs_k[:, None], mask=wmask, other=0.0)  # [BLOCK_K, BLOCK_N]
        wu = tl.load(u_cols + offs_k[:, None], mask=wmask, other=0.0)
        acc_g = tl.dot(xk, wg, acc_g)
        acc_u = tl.dot(xk, wu, acc_u)
    if LAUNCH_AT_END:  # the next launch comes in as this one's programs finish their sums
        pdl_launch(PDL)
    gate = tl.sum(tl.where(row0, acc_g, 0.0), axis=0)  # [BLOCK_N]: row 0
    up = tl.sum(tl.where(row0, acc_u, 0.0), axis=0)
    _gated_store(gate, up, h_row, offs_n, mask_n)


@triton.jit
def _dot_rows(
    rows, h_row, K, mask_n, w_first, FIRST: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    # fp32 [BLOCK_N]: weight rows (pointers [BLOCK_N, 1], K contiguous columns) dot h[:K];
    # FIRST: w_first is the first chunk of the rows, already read (same products, same order)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if FIRST:
        offs_k = tl.arange(0, BLOCK_K)
        hk = tl.load(h_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        acc += w_first.to(tl.float32) * hk[None, :]
    for k0 in range(BLOCK_K if FIRST else 0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        hk = tl.load(h_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += w.to(tl.float32) * hk[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _expert_rows(w_ptr, ids_ptr, r, offs_n, stride_we, stride_wn, EARLY: tl.constexpr):
    # [BLOCK_N, 1] pointers to rows offs_n of expert ids[r]; EARLY: read before the PDL wait
    # (the ids are complete, see LAUNCH_AFTER_WAIT; .cg: from the L2, not a stale L1 line)
    if EARLY:
        e = tl.load(ids_ptr + r, cache_modifier=".cg").to(tl.int64)
    else:
        e = tl.load(ids_ptr + r).to(tl.int64)
    return w_ptr + e * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn


@triton.jit
def _first_chunk(rows, mask_n, K, BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    return tl.load(rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)


@triton.jit
def _moe_down_kernel(
    h_ptr,
    w_ptr,
    ids_ptr,
    topk_w_ptr,
    add_ptr,
    hs_ptr,
    ws_ptr,
    out_ptr,
    D,
    I,
    IS,
    stride_we,
    stride_wn,
    stride_wsn,
    TOPK: tl.constexpr,
    HAS_ADD: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    PRELOAD: tl.constexpr,
):
    # out[t] = round(sum_j wt[t, j] * round(w2[e_j] @ h[t * TOPK + j])) (+ add[t], rounded),
    # the add being the shared experts' round(ws2 @ hs[t]) when HAS_SHARED. PRELOAD (0-2):
    # the first K chunk of experts j < PRELOAD is read before the wait on the up launch.
    pdl_launch(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    if PRELOAD >= 1:
        rows0 = _expert_rows(w_ptr, ids_ptr, t * TOPK, offs_n, stride_we, stride_wn, True)
        w0 = _first_chunk(rows0, mask_n, I, BLOCK_K)
    if PRELOAD >= 2:
        rows1 = _expert_rows(w_ptr, ids_ptr, t * TOPK + 1, offs_n, stride_we, stride_wn, True)
        w1 = _first_chunk(rows1, mask_n, I, BLOCK_K)
    pdl_wait(PDL)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        r = t * TOPK + j
        if PRELOAD >= 1 and j == 0:
            y = _dot_rows(rows0, h_ptr + r * I, I, mask_n, w0, True, BLOCK_N, BLOCK_K)
        elif PRELOAD >= 2 and j == 1:
            y = _dot_rows(rows1, h_ptr + r * I, I, mask_n, w1, True, BLOCK_N, BLOCK_K)
        else:
            rows = _expert_rows(w_ptr, ids_ptr, r, offs_n, stride_we, stride_wn, False)
            y = _dot_rows(rows, h_ptr + r * I, I, mask_n, rows, False, BLOCK_N, BLOCK_K)
        total += y.to(out_ptr.dtype.element_ty).to(tl.float32) * tl.load(topk_w_ptr + r)
    out = total.to(out_ptr.dtype.element_ty)
    if HAS_SHARED:
        rows = ws_ptr + offs_n.to(tl.int64)[:, None] * stride_wsn
        shared = _dot_rows(rows, hs_ptr + t * IS, IS, mask_n, rows, False, BLOCK_N, BLOCK_K)
        shared = shared.to(out_ptr.dtype.element_ty)  # the shared MLP's output, rounded
        out = (out.to(tl.float32) + shared.to(tl.float32)).to(out_ptr.dtype.element_ty)
    elif HAS_ADD:  # rounded like the unfused `moe_out + shared_out`
        add = tl.load(add_ptr + t * D + offs_n, mask=mask_n, other=0.0)
        out = (out.to(tl.float32) + add.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * D + offs_n, out, mask=mask_n)


def fused_moe_decode(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    add: torch.Tensor | None = None,
    tiles: MoeDecodeTiles | None = None,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    add_stream: torch.cuda.Stream | None = None,
    up_done: torch.cuda.Event | None = None,
) -> torch.Tensor:
    """Same contract as ``kernels.moe.fused_moe``, for a few tokens: no sort, no padding, two
    launches, the k-way sum and the shared add fused into the down projection.

    ``up_done``: recorded on the current stream between the up and the down launch, so work
    on another stream can wait for the up launch's weight stream to end and run beside the
    down launch (the deferred shared down projection, ``engine.layers.moe``).

    ``add_stream``: ``add`` is being computed on that stream; the current stream waits for
    it just before the down launch, so the up launch overlaps it.

    ``shared`` = (gate_up ``[2Is, D]``, down ``[D, Is]``): the shared experts' gated MLP runs
    inside the same two launches (its rows after the routed ones) and is added as ``add``
    would be, rounded as the separate GEMVs and add round."""
    # T tokens, k slots, D hidden, I intermediate, E experts, Is shared intermediate
    t, d = x.shape
    e, two_i, _ = w13.shape
    i = two_i // 2
    top_k = topk_ids.shape[1]
    assert w13.is_contiguous() and w2.is_contiguous() and w2.shape == (e, d, i), w2.shape
    assert x.stride(1) == 1, x.stride()
    assert topk_ids.is_contiguous() and topk_ids.dtype == torch.int32, topk_ids.dtype
    assert topk_weights.is_contiguous() and topk_weights.dtype == torch.float32
    assert topk_ids.shape == topk_weights.shape == (t, top_k), topk_ids.shape
    if add is not None:
        assert add.shape == (t, d) and add.is_contiguous() and add.dtype == x.dtype, add.shape
    assert shared is None or add is None, "shared experts ride in the kernel: no add as well"
    i_s = 0
    if shared is not None:
        ws13, ws2 = shared
        i_s = ws13.shape[0] // 2
        assert ws13.shape == (2 * i_s, d) and ws2.shape == (d, i_s), (ws13.shape, ws2.shape)
        assert ws13.is_contiguous() and ws2.is_contiguous(), "shared weights must be contiguous"
        assert ws13.dtype == ws2.dtype == w13.dtype, (ws13.dtype, w13.dtype)
    tiles = tiles or MOE_DECODE_TILES
    out = torch.empty(t, d, dtype=x.dtype, device=x.device)  # [T, D]
    if t == 0:
        return out
    h = torch.empty(t * top_k, i, dtype=x.dtype, device=x.device)  # [T*k, I]
    hs = torch.empty(t, max(i_s, 1), dtype=x.dtype, device=x.device)  # [T, Is]
    dot = (
        MOE_UP_DOT
        and t >= UP_DOT_MIN_TOKENS
        and w13.dtype in (torch.bfloat16, torch.float16)
        and x.dtype == w13.dtype  # tl.dot takes one dtype; the FMA loop upcasts x
    )
    up_n = tiles.up_dot[0] if dot else tiles.up_block_n
    nb_i, nb_s = triton.cdiv(i, up_n), triton.cdiv(max(i_s, 1), up_n)
    n_shared = t * nb_s if shared is not None else 0
    ws13, ws2 = shared if shared is not None else (w13, w2)  # placeholders when unused
    pdl = use_pdl(x)
    down_preload = min(tiles.down_preload, top_k, 2)  # without PDL: plain stream order
    pdl_up = pdl and (add_stream is None or UP_PDL_BESIDE)
    if dot:
        _, bk, stages, warps = tiles.up_dot
        up_kernel, up_meta = _moe_up_dot_kernel, {"BLOCK_K": bk, "STAGES": stages}
        up_meta["LAUNCH_AT_END"] = UP_DOT_LAUNCH_AT_END
        up_meta["num_warps"] = warps
    else:
        up_kernel, up_meta = _moe_up_kernel, {"BLOCK_K": tiles.up_block_k}
        up_meta.update(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    up_kernel[(n_shared + t * top_k * nb_i,)](
        x,
        w13,
        topk_ids,
        h,
        ws13,
        hs,
        i,
        i_s,
        d,
        n_shared,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        ws13.stride(-2),
        TOPK=top_k,
        NB_I=nb_i,
        NB_S=nb_s,
        HAS_SHARED=shared is not None,
        BLOCK_N=up_n,
        PDL=pdl,
        LAUNCH_AFTER_WAIT=down_preload > 0,
        launch_pdl=pdl_up,
        **up_meta,
    )
    if up_done is not None:
        up_done.record(torch.cuda.current_stream(x.device))
    if add_stream is not None:
        torch.cuda.current_stream(x.device).wait_stream(add_stream)
    _moe_down_kernel[(t, triton.cdiv(d, tiles.down_block_n))](
        h,
        w2,
        topk_ids,
        topk_weights,
        out if add is None else add,
        hs,
        ws2,
        out,
        d,
        i,
        i_s,
        w2.stride(0),
        w2.stride(1),
        ws2.stride(-2),
        TOPK=top_k,
        HAS_ADD=add is not None,
        HAS_SHARED=shared is not None,
        BLOCK_N=tiles.down_block_n,
        BLOCK_K=tiles.down_block_k,
        PDL=pdl,
        PRELOAD=down_preload,
        num_warps=tiles.down_num_warps or tiles.num_warps,
        num_stages=tiles.num_stages,
        launch_pdl=pdl,
    )
    return out
