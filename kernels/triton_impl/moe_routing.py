"""MoE routing glue as single launches: top-k routing and the expert sort for grouped GEMM.

In torch each of these is 10-20 tiny kernels (softmax, add, topk, gather, sum, clamp, div,
cast; scatter_add, cumsum, argsort, searchsorted, ...). At decode every one of them costs a
launch of ~2 us for a few hundred bytes of work, per MoE layer, so they dominated the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import _dispatch
from kernels._dispatch import next_pow2, num_sms, use_pdl
from kernels.triton_impl.attention_decode import zeroed_counters
from kernels.triton_impl.pdl import pdl_enter, pdl_launch, pdl_wait
from kernels.triton_impl.rms_norm import NUM_WARPS as NORM_NUM_WARPS
from kernels.triton_impl.rms_norm import add_residual, rms_apply, rms_rstd


@triton.jit
def _route_token(
    x,
    offs_e,
    mask_e,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    t,
    norm_min,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RANKED: tl.constexpr = False,
):
    # Token t's logits x [BLOCK_E] (-inf past E): softmax over E, top-k of (probs + bias)
    # (descending, first index on ties, as torch.topk), renormalise the unbiased probs,
    # store k weights and ids. Top-k by K rounds of argmax (2K reductions in a row), or
    # RANKED: every expert's rank (how many experts beat it: a higher score, or the same at a
    # lower index) in one [E, E] comparison, and slot j takes the expert ranked j (2 more
    # reductions, all independent). The same experts in the same slots with the same weights.
    x = x.to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = p / tl.sum(p, axis=0)  # [BLOCK_E] softmax; 0 past E
    score = p
    if HAS_BIAS:
        score = p + tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    score = tl.where(mask_e, score, float("-inf"))
    offs_k = tl.arange(0, BLOCK_K)
    if RANKED:
        beats = (score[None, :] > score[:, None]) | (
            (score[None, :] == score[:, None]) & (offs_e[None, :] < offs_e[:, None])
        )  # [BLOCK_E, BLOCK_E]: expert j (columns) ranks above expert i (rows)
        rank = tl.sum(beats.to(tl.int32), axis=1)  # [BLOCK_E], a permutation of 0..BLOCK_E-1
        slot = rank[None, :] == offs_k[:, None]  # [BLOCK_K, BLOCK_E]: one expert per slot
        w = tl.sum(tl.where(slot, p[None, :], 0.0), axis=1)
        ids = tl.sum(tl.where(slot, offs_e[None, :], 0), axis=1).to(tl.int32)
        w = tl.where(offs_k < K, w, 0.0)
    else:
        w = tl.zeros([BLOCK_K], dtype=tl.float32)
        ids = tl.zeros([BLOCK_K], dtype=tl.int32)
        for j in tl.static_range(K):
            best = tl.argmax(score, axis=0)
            pick = offs_e == best
            w = tl.where(offs_k == j, tl.sum(tl.where(pick, p, 0.0), axis=0), w)
            ids = tl.where(offs_k == j, best.to(tl.int32), ids)
            score = tl.where(pick, float("-inf"), score)
    w = w / tl.maximum(tl.sum(w, axis=0), norm_min)
    mask_k = offs_k < K
    tl.store(weights_ptr + t * K + offs_k, w, mask=mask_k)
    tl.store(ids_ptr + t * K + offs_k, ids, mask=mask_k)


@triton.jit
def _route_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    stride_lt,
    norm_min,
    E: tl.constexpr,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    x = tl.load(logits_ptr + t * stride_lt + offs_e, mask=mask_e, other=float("-inf"))
    _route_token(
        x, offs_e, mask_e, bias_ptr, weights_ptr, ids_ptr, t, norm_min, K, HAS_BIAS, BLOCK_K
    )


def route_triton(
    gate_logits: torch.Tensor, k: int, bias: torch.Tensor | None, norm_min: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``kernels.moe.route``; one launch."""
    # T tokens, E experts
    t, e = gate_logits.shape
    assert gate_logits.stride(1) == 1, gate_logits.stride()
    assert k <= e, (k, e)
    if bias is not None:
        bias = bias.reshape(-1)
        assert bias.shape == (e,) and bias.is_contiguous(), bias.shape
    weights = torch.empty(t, k, dtype=torch.float32, device=gate_logits.device)  # [T, k]
    ids = torch.empty(t, k, dtype=torch.int32, device=gate_logits.device)  # [T, k]
    if t == 0:
        return weights, ids
    pdl = use_pdl(gate_logits)
    _route_kernel[(t,)](
        gate_logits,
        gate_logits if bias is None else bias,  # placeholder pointer when unused
        weights,
        ids,
        gate_logits.stride(0),
        norm_min,
        E=e,
        K=k,
        HAS_BIAS=bias is not None,
        BLOCK_E=next_pow2(e),
        BLOCK_K=next_pow2(k),
        PDL=pdl,
        launch_pdl=pdl,
    )
    return weights, ids


@triton.jit
def _router_input(
    x_ptr,
    res_ptr,
    nw_ptr,
    t,
    stride_xt,
    stride_rt,
    offs,
    mask,
    rstd,
    NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    # Columns `offs` of token t's router input, fp32: the hidden row itself, or with NORM
    # the normalised `h (+ residual)` rounded exactly as `_rms_norm_kernel` rounds it.
    xv = tl.load(x_ptr + t * stride_xt + offs, mask=mask, other=0.0)
    if NORM:
        if HAS_RESIDUAL:
            xv = add_residual(xv, tl.load(res_ptr + t * stride_rt + offs, mask=mask, other=0.0))
        xv = rms_apply(xv, rstd, tl.load(nw_ptr + offs, mask=mask, other=0.0))
    return xv.to(tl.float32)


@triton.jit
def _router_chunk(w_ptr, offs_e, mask_e, d0, D, BLOCK_D: tl.constexpr):
    # fp32 [E_PER, BLOCK_D]: router columns [d0, d0 + BLOCK_D) of experts offs_e
    offs_d = d0 + tl.arange(0, BLOCK_D)
    return tl.load(
        w_ptr + offs_e[:, None] * D + offs_d[None, :],
        mask=mask_e[:, None] & (offs_d < D)[None, :],
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _router_fma(
    acc, w, x_ptr, res_ptr, nw_ptr, t, stride_xt, stride_rt, d0, D, rstd,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # acc [E_PER, BLOCK_D] += w * (the router input's columns [d0, d0 + BLOCK_D))
    offs_d = d0 + tl.arange(0, BLOCK_D)
    xv = _router_input(
        x_ptr, res_ptr, nw_ptr, t, stride_xt, stride_rt, offs_d, offs_d < D, rstd,
        NORM, HAS_RESIDUAL,
    )  # fmt: skip
    return acc + w * xv[None, :]


@triton.jit
def _gate_route_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    logits_ptr,
    count_ptr,
    weights_ptr,
    ids_ptr,
    res_ptr,
    nw_ptr,
    x_out_ptr,
    res_out_ptr,
    D,
    stride_xt,
    stride_rt,
    norm_min,
    eps,
    E: tl.constexpr,
    K: tl.constexpr,
    NPROG: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    E_PER: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM_D: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
    PRELOAD: tl.constexpr,
    LATE_LAUNCH: tl.constexpr,
    RANKED: tl.constexpr,
):
    # Grid (T, NPROG): program (t, c) computes the fp32 logits of experts
    # [c*E_PER, (c+1)*E_PER) for token t from the bf16/fp32 hidden row (upcast in registers,
    # as `F.linear(x.float(), W)`), publishes them, and bumps the token's counter; the
    # program that bumps it last (acq_rel atomics order the stores) routes the token with
    # `_route_token`, as `_route_kernel` does, and puts the counter back to zero.
    #
    # NORM_D > 0 (= D, a constant as in `_rms_norm_kernel`): x is h, the router input is
    # `rms_norm(h + residual) * nw`. Every program reduces the whole row's sum of squares
    # itself (one `tl.sum` over BLOCK_N = next_pow2(D), as the norm kernel does), then
    # normalises each chunk it reads; program c == 0 also stores the normalised row and the
    # residual sum for the expert kernels and the next layer.
    #
    # PRELOAD (0-4): the first PRELOAD BLOCK_D-column chunks of this program's router rows
    # are read before the wait on the previous kernel (weights are never written during a
    # step); same products in the same order.
    #
    # LATE_LAUNCH: the next kernel is let in only once this program's logits are published,
    # not at its start, so its programs do not take SM slots (waiting) while this one runs.
    if not LATE_LAUNCH:
        pdl_launch(PDL)
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs_e = c * E_PER + tl.arange(0, E_PER)
    mask_e = offs_e < E
    if PRELOAD >= 1:
        w0 = _router_chunk(w_ptr, offs_e, mask_e, 0, D, BLOCK_D)
    if PRELOAD >= 2:
        w1 = _router_chunk(w_ptr, offs_e, mask_e, BLOCK_D, D, BLOCK_D)
    if PRELOAD >= 3:
        w2 = _router_chunk(w_ptr, offs_e, mask_e, 2 * BLOCK_D, D, BLOCK_D)
    if PRELOAD >= 4:
        w3 = _router_chunk(w_ptr, offs_e, mask_e, 3 * BLOCK_D, D, BLOCK_D)
    pdl_wait(PDL)
    NORM: tl.constexpr = NORM_D > 0
    rstd = 1.0
    if NORM:
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < NORM_D
        h = tl.load(x_ptr + t * stride_xt + offs_n, mask=mask_n, other=0.0)
        if HAS_RESIDUAL:
            h = add_residual(h, tl.load(res_ptr + t * stride_rt + offs_n, mask=mask_n, other=0.0))
        rstd = rms_rstd(h, eps, NORM_D)
        if c == 0:
            nw = tl.load(nw_ptr + offs_n, mask=mask_n, other=0.0)
            tl.store(x_out_ptr + t * NORM_D + offs_n, rms_apply(h, rstd, nw), mask=mask_n)
            if HAS_RESIDUAL:
                tl.store(res_out_ptr + t * NORM_D + offs_n, h, mask=mask_n)
    acc = tl.zeros([E_PER, BLOCK_D], dtype=tl.float32)
    if PRELOAD >= 1:
        acc = _router_fma(acc, w0, x_ptr, res_ptr, nw_ptr, t, stride_xt, stride_rt, 0, D, rstd,
                          NORM, HAS_RESIDUAL, BLOCK_D)  # fmt: skip
    if PRELOAD >= 2:
        acc = _router_fma(acc, w1, x_ptr, res_ptr, nw_ptr, t, stride_xt, stride_rt, BLOCK_D, D,
                          rstd, NORM, HAS_RESIDUAL, BLOCK_D)  # fmt: skip
    if PRELOAD >= 3:
        acc = _router_fma(acc, w2, x_ptr, res_ptr, nw_ptr, t, stride_xt, stride_rt, 2 * BLOCK_D,
                          D, rstd, NORM, HAS_RESIDUAL, BLOCK_D)  # fmt: skip
    if PRELOAD >= 4:
        acc = _router_fma(acc, w3, x_ptr, res_ptr, nw_ptr, t, stride_xt, stride_rt, 3 * BLOCK_D,
                          D, rstd, NORM, HAS_RESIDUAL, BLOCK_D)  # fmt: skip
    for d0 in range(PRELOAD * BLOCK_D, D, BLOCK_D):
        w = _router_chunk(w_ptr, offs_e, mask_e, d0, D, BLOCK_D)
        acc = _router_fma(acc, w, x_ptr, res_ptr, nw_ptr, t, stride_xt, stride_rt, d0, D, rstd,
                          NORM, HAS_RESIDUAL, BLOCK_D)  # fmt: skip
    tl.store(logits_ptr + t * E + offs_e, tl.sum(acc, axis=1), mask=mask_e)
    # every warp's logits stored before the (acq_rel) arrival publishes them
    tl.debug_barrier()
    last = tl.atomic_add(count_ptr + t, 1) == NPROG - 1
    if LATE_LAUNCH:
        pdl_launch(PDL)
    if last:
        tl.atomic_xchg(count_ptr + t, 0)
        offs = tl.arange(0, BLOCK_E)
        mask = offs < E
        x = tl.load(logits_ptr + t * E + offs, mask=mask, other=float("-inf"), volatile=True)
        _route_token(
            x, offs, mask, bias_ptr, weights_ptr, ids_ptr, t, norm_min, K, HAS_BIAS, BLOCK_K,
            RANKED,
        )  # fmt: skip


TOPK_RANKED = False
"""The fused router's last program picks the top-k by ranking every expert at once (one
[E, E] comparison) instead of k rounds of argmax, each two reductions across its warps in a
row. Same experts, slots and weights."""
TOPK_RANKED_MAX_EXPERTS = 128
"""Above this many experts (padded) the [E, E] comparison is too many registers: argmax."""

GATE_ROUTE_MAX_TOKENS = 4
"""Decode sizes: one launch for the router GEMV and the routing. H100, 28B shapes, graph
replay (bench/router_bench.py): 6.1 vs 10.2 us a router at T=1, 6.2 vs 16.0 at T=4 for
cast + cuBLAS + route; bigger batches keep that path."""
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device) -> torch.Tensor:
    """Per-token arrival counters, zero between launches (each launch resets its own)."""
    buf = _COUNTERS.get(device)
    if buf is None:
        buf = _COUNTERS[device] = torch.zeros(
            GATE_ROUTE_MAX_TOKENS, dtype=torch.int32, device=device
        )
    return buf


def gate_route_triton(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    k: int,
    bias: torch.Tensor | None,
    norm_min: float,
    experts_per_program: int = 2,
    block_d: int = 1024,
    num_warps: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``kernels.moe.gate_route``; one launch, T <= GATE_ROUTE_MAX_TOKENS."""
    weights, ids, _, _ = _launch(
        x, gate_weight, k, bias, norm_min, None, experts_per_program, block_d, num_warps
    )
    return weights, ids


LATE_LAUNCH = True
"""Under PDL the router lets the next launch (the routed experts' up GEMV) be scheduled only
after its logits are published instead of at its start, so the up launch's programs do not
sit in the SM slots the side stream's shared experts need while the router runs."""

ROUTER_PRELOAD: int | None = 3
"""Router weight chunks read before the PDL wait (None: ``_dispatch.PDL_PRELOAD``; at most
``_dispatch.PRELOAD_MAX_CHUNKS``, and the row's chunks): 3 reads the whole 28B row (2560
columns) before it, so after the wait the router waits on no DRAM read, which the side
stream's shared experts make slow then. Same products in the same order."""

NORM_ROUTE_TILES = (4, 1024)
"""(experts per program, hidden columns per step) of the fused norm + router launch. H200,
28B b1 / b4 replay (bench/RESULTS.md, 2026-12-03), 4 experts a program reading all 3 chunks
before the wait against 2 reading 2: -0.040 / -0.012 and -0.043 / -0.019 ms in two calls,
bit-identical (each expert's sum is the same)."""
NORM_ROUTE_WARPS: int | None = 8
"""Warps of the fused norm + router launch. H100, 28B b1 step replayed: 8 warps 3.224 ms, 4
(the norm kernel's count, which makes x bit-identical to ``rms_norm_triton``'s) 3.249, norm
and router as two launches 3.237 (bench/RESULTS.md). At 8 the sum of squares reduces in
another order: x may differ from the norm kernel's in the last bf16 bit. None: the norm
kernel's count."""


def norm_gate_route_triton(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    gate_weight: torch.Tensor,
    k: int,
    bias: torch.Tensor | None,
    norm_min: float,
    experts_per_program: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``kernels.moe.norm_gate_route``; one launch, T <= GATE_ROUTE_MAX_TOKENS.

    x and residual_out are bit-identical to ``rms_norm_triton`` at the default ``num_warps``
    (the norm kernel's: the sum of squares reduces in the same order)."""
    # T tokens, D hidden
    t, d = h.shape
    assert norm_weight.shape == (d,) and norm_weight.is_contiguous(), norm_weight.shape
    if residual is not None:
        assert residual.shape == h.shape and residual.dtype == h.dtype, residual.shape
        assert residual.stride(1) == 1, residual.stride()
    x = torch.empty(t, d, dtype=h.dtype, device=h.device)  # [T, D]
    res_out = h if residual is None else torch.empty_like(x)  # [T, D]
    weights, ids, _, _ = _launch(
        h,
        gate_weight,
        k,
        bias,
        norm_min,
        (residual, norm_weight, eps, x, res_out),
        experts_per_program or NORM_ROUTE_TILES[0],
        block_d or NORM_ROUTE_TILES[1],
        num_warps or NORM_ROUTE_WARPS or NORM_NUM_WARPS,
    )
    return weights, ids, x, res_out


def _launch(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    k: int,
    bias: torch.Tensor | None,
    norm_min: float,
    norm: tuple[torch.Tensor | None, torch.Tensor, float, torch.Tensor, torch.Tensor] | None,
    experts_per_program: int,
    block_d: int,
    num_warps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # T tokens, D hidden, E experts; norm = (residual, weight, eps, x_out, res_out)
    t, d = x.shape
    e = gate_weight.shape[0]
    assert 0 < t <= GATE_ROUTE_MAX_TOKENS, t
    assert x.stride(1) == 1 and gate_weight.is_contiguous(), (x.stride(), gate_weight.stride())
    assert gate_weight.shape == (e, d) and k <= e, (gate_weight.shape, k)
    if bias is not None:
        bias = bias.reshape(-1)
        assert bias.shape == (e,) and bias.is_contiguous(), bias.shape
    dev = x.device
    logits = torch.empty(t, e, dtype=torch.float32, device=dev)  # [T, E] scratch
    weights = torch.empty(t, k, dtype=torch.float32, device=dev)  # [T, k]
    ids = torch.empty(t, k, dtype=torch.int32, device=dev)  # [T, k]
    residual, norm_weight, eps, x_out, res_out = norm or (None, x, 0.0, x, x)  # x: placeholders
    res = x if residual is None else residual
    per = next_pow2(min(experts_per_program, e))
    nprog = triton.cdiv(e, per)
    pdl = use_pdl(x)
    _gate_route_kernel[(t, nprog)](
        x,
        gate_weight,
        gate_weight if bias is None else bias,  # placeholder pointer when unused
        logits,
        _counters(dev),
        weights,
        ids,
        res,
        norm_weight,
        x_out,
        res_out,
        d,
        x.stride(0),
        res.stride(0),
        norm_min,
        eps,
        E=e,
        K=k,
        NPROG=nprog,
        HAS_BIAS=bias is not None,
        E_PER=per,
        BLOCK_D=block_d,
        BLOCK_E=next_pow2(e),
        BLOCK_K=next_pow2(k),
        NORM_D=d if norm is not None else 0,
        HAS_RESIDUAL=residual is not None,
        BLOCK_N=next_pow2(d) if norm is not None else 1,
        PDL=pdl,
        PRELOAD=_dispatch.preload_chunks(d, block_d, depth=ROUTER_PRELOAD),
        LATE_LAUNCH=LATE_LAUNCH,
        RANKED=TOPK_RANKED and next_pow2(e) <= TOPK_RANKED_MAX_EXPERTS,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    return weights, ids, x_out, res_out


@triton.jit
def _route_rows(
    x, offs_t, mask_t, offs_e, mask_e, bias_ptr, weights_ptr, ids_ptr, norm_min,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # `_route_token` for a block of tokens at once: x [BLOCK_T, BLOCK_E] fp32 logits (columns
    # past E ignored); each row's softmax, biased top-k (k rounds of a row-wise argmax, first
    # index on ties) and renormalised weights, stored for the rows in mask_t.
    x = tl.where(mask_e[None, :], x, float("-inf"))
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]  # [BLOCK_T, BLOCK_E]; 0 past E
    score = p
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        score = p + bias[None, :]
    score = tl.where(mask_e[None, :], score, float("-inf"))
    offs_k = tl.arange(0, BLOCK_K)
    w = tl.zeros([x.shape[0], BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([x.shape[0], BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.argmax(score, axis=1)  # [BLOCK_T]
        pick = offs_e[None, :] == best[:, None]
        slot = offs_k[None, :] == j
        w = tl.where(slot, tl.sum(tl.where(pick, p, 0.0), axis=1)[:, None], w)
        ids = tl.where(slot, best.to(tl.int32)[:, None], ids)
        score = tl.where(pick, float("-inf"), score)
    w = w / tl.maximum(tl.sum(w, axis=1), norm_min)[:, None]
    at = offs_t[:, None] * K + offs_k[None, :]
    mask = mask_t[:, None] & (offs_k < K)[None, :]
    tl.store(weights_ptr + at, w, mask=mask)
    tl.store(ids_ptr + at, ids, mask=mask)


@triton.jit
def _batch_gate_route_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    part_ptr,
    count_ptr,
    weights_ptr,
    ids_ptr,
    T,
    D,
    D_PER,
    stride_xt,
    norm_min,
    E: tl.constexpr,
    K: tl.constexpr,
    SPLITS: tl.constexpr,
    NPROG: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    E_PER: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    # Grid (token blocks, expert blocks, hidden splits): program (b, c, s) computes the
    # logits of tokens [b*BLOCK_T, ...) for experts [c*E_PER, ...) over hidden columns
    # [s*D_PER, (s+1)*D_PER) on tensor cores, publishes them in part[s] and bumps the token
    # block's counter; the program that bumps it last (acq_rel atomics order the stores)
    # sums the SPLITS parts in split order, routes the block (`_route_rows`) and puts the
    # counter back to zero.
    #
    # fp32 logits from bf16 dots: each fp32 router weight w is the exact sum of three bf16
    # pieces (hi = bf16(w), mid = bf16(w - hi), lo = w - hi - mid: 8 + 8 + 8 significant
    # bits), and a bf16 hidden value times a bf16 piece is exact in the fp32 accumulator.
    # So the logits carry fp32 products summed in fp32, as `F.linear(x.float(), W)` has
    # them, in another order; one bf16 piece alone would be ~3 decimal digits short.
    pdl_enter(PDL)
    b = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.program_id(2)
    offs_t = b * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    rows = offs_t.to(tl.int64)
    offs_e = c * E_PER + tl.arange(0, E_PER)
    mask_e = offs_e < E
    d_end = tl.minimum(s * D_PER + D_PER, D)
    acc = tl.zeros([BLOCK_T, E_PER], dtype=tl.float32)
    for d0 in range(s * D_PER, d_end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d_end
        xv = tl.load(
            x_ptr + rows[:, None] * stride_xt + offs_d[None, :],
            mask=mask_t[:, None] & mask_d[None, :],
            other=0.0,
        )  # [BLOCK_T, BLOCK_D] bf16
        w = tl.load(
            w_ptr + offs_e[None, :] * D + offs_d[:, None],
            mask=mask_d[:, None] & mask_e[None, :],
            other=0.0,
        )  # [BLOCK_D, E_PER] fp32
        hi = w.to(tl.bfloat16)
        rest = w - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(xv, lo, acc)  # the small pieces first
        acc = tl.dot(xv, mid, acc)
        acc = tl.dot(xv, hi, acc)
    part = part_ptr + s * T * E + rows[:, None] * E + offs_e[None, :]
    tl.store(part, acc, mask=mask_t[:, None] & mask_e[None, :])
    # every warp's logits stored before the (acq_rel) arrival publishes them
    tl.debug_barrier()
    last = tl.atomic_add(count_ptr + b, 1) == NPROG - 1
    if last:
        tl.atomic_xchg(count_ptr + b, 0)
        offs = tl.arange(0, BLOCK_E)
        mask = offs < E
        at = rows[:, None] * E + offs[None, :]
        m2 = mask_t[:, None] & mask[None, :]
        logits = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for i in tl.static_range(SPLITS):
            logits += tl.load(part_ptr + i * T * E + at, mask=m2, other=0.0, volatile=True)
        _route_rows(
            logits, offs_t, mask_t, offs, mask, bias_ptr, weights_ptr, ids_ptr, norm_min,
            K, HAS_BIAS, BLOCK_K,
        )  # fmt: skip


@dataclass(frozen=True)
class BatchRouteTiles:
    """Tokens and experts a program of the batch router multiplies, hidden columns a step."""

    block_t: int
    experts_per_program: int = 16
    block_d: int = 128
    num_warps: int = 4


BATCH_ROUTE_TILES: list[tuple[int, BatchRouteTiles]] = [
    (64, BatchRouteTiles(16)),
    (1 << 62, BatchRouteTiles(32)),
]
"""(max tokens, tiles), first match wins. Not tuned on a card yet (bench/router_bench.py)."""

BATCH_ROUTE_MAX_TOKENS = 512
"""Up to this many tokens `batch_gate_route_triton` applies when `kernels.moe.BATCH_ROUTER`
asks for it; beyond, the tokens' blocks alone fill the card and cuBLAS's GEMM is the
better tool."""
BATCH_ROUTE_COUNTERS = 64
"""Token blocks a launch may have (arrival counters kept per device)."""
_BATCH_COUNTERS: dict[torch.device, torch.Tensor] = {}


def batch_route_splits(
    t: int, e: int, d: int, tiles: BatchRouteTiles, device: torch.device
) -> tuple[int, int]:
    """(hidden splits, columns a split): enough programs for about one wave of the SMs, each
    split a whole number of BLOCK_D steps. Shapes only, fixed for a CUDA-graph bucket."""
    blocks = triton.cdiv(t, tiles.block_t) * triton.cdiv(e, tiles.experts_per_program)
    steps = triton.cdiv(d, tiles.block_d)
    want = max(1, min(steps, num_sms(device) // blocks))
    d_per = triton.cdiv(steps, want) * tiles.block_d
    return triton.cdiv(d, d_per), d_per


def batch_router_applies(x: torch.Tensor, gate_weight: torch.Tensor) -> bool:
    """bf16 hidden rows, an fp32 router, 1..BATCH_ROUTE_MAX_TOKENS tokens, counters ready."""
    t = x.shape[0]
    tiles = pick_batch_route_tiles(t)
    return (
        x.dtype == torch.bfloat16
        and gate_weight.dtype == torch.float32
        and 0 < t <= BATCH_ROUTE_MAX_TOKENS
        and triton.cdiv(t, tiles.block_t) <= BATCH_ROUTE_COUNTERS
        and x.stride(-1) == 1
        and zeroed_counters(_BATCH_COUNTERS, x.device, BATCH_ROUTE_COUNTERS) is not None
    )


def pick_batch_route_tiles(t: int) -> BatchRouteTiles:
    return next(tiles for bound, tiles in BATCH_ROUTE_TILES if t <= bound)


def batch_gate_route_triton(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    k: int,
    bias: torch.Tensor | None,
    norm_min: float,
    tiles: BatchRouteTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``kernels.moe.gate_route`` for bf16 ``x``; one launch (the cast, the
    fp32 GEMM and its split-K reduction, and the routing launch otherwise)."""
    # T tokens, D hidden, E experts, S hidden splits
    t, d = x.shape
    e = gate_weight.shape[0]
    tiles = tiles or pick_batch_route_tiles(t)
    nblocks = triton.cdiv(t, tiles.block_t)
    assert x.dtype == torch.bfloat16 and x.stride(1) == 1, (x.dtype, x.stride())
    assert gate_weight.dtype == torch.float32 and gate_weight.is_contiguous(), gate_weight.dtype
    assert gate_weight.shape == (e, d) and 0 < k <= e, (gate_weight.shape, k)
    assert t > 0 and nblocks <= BATCH_ROUTE_COUNTERS, (t, tiles)
    for size in (tiles.block_t, tiles.experts_per_program, tiles.block_d):
        assert size >= 16 and size == next_pow2(size), tiles  # tl.dot's smallest tile
    if bias is not None:
        bias = bias.reshape(-1)
        assert bias.shape == (e,) and bias.is_contiguous(), bias.shape
    dev = x.device
    counters = zeroed_counters(_BATCH_COUNTERS, dev, BATCH_ROUTE_COUNTERS)
    assert counters is not None, "batch router counters are made by an eager call first"
    splits, d_per = batch_route_splits(t, e, d, tiles, dev)
    nexp = triton.cdiv(e, tiles.experts_per_program)
    part = torch.empty(splits, t, e, dtype=torch.float32, device=dev)  # [S, T, E] scratch
    weights = torch.empty(t, k, dtype=torch.float32, device=dev)  # [T, k]
    ids = torch.empty(t, k, dtype=torch.int32, device=dev)  # [T, k]
    pdl = use_pdl(x)
    _batch_gate_route_kernel[(nblocks, nexp, splits)](
        x,
        gate_weight,
        gate_weight if bias is None else bias,  # placeholder pointer when unused
        part,
        counters,
        weights,
        ids,
        t,
        d,
        d_per,
        x.stride(0),
        norm_min,
        E=e,
        K=k,
        SPLITS=splits,
        NPROG=nexp * splits,
        HAS_BIAS=bias is not None,
        BLOCK_T=tiles.block_t,
        E_PER=tiles.experts_per_program,
        BLOCK_D=tiles.block_d,
        BLOCK_E=next_pow2(e),
        BLOCK_K=next_pow2(k),
        PDL=pdl,
        num_warps=tiles.num_warps,
        launch_pdl=pdl,
    )
    return weights, ids


@triton.jit
def _align_kernel(
    ids_ptr,
    sorted_ptr,
    expert_ids_ptr,
    num_post_ptr,
    scratch_ptr,  # [2E] int32: counts, then each expert's first padded row
    n,
    P,
    NB,
    E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PDL: tl.constexpr,
):
    # One program. Phases are separated by barriers: a CTA sees its own global writes
    # after __syncthreads. Rows inside an expert's run come in atomic order, not stable
    # order; the GEMM does not care (each row is written back by its own id).
    pdl_enter(PDL)
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    tl.store(scratch_ptr + offs_e, tl.zeros([BLOCK_E], dtype=tl.int32), mask=mask_e)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        tl.store(sorted_ptr + offs_p, tl.zeros([BLOCK_P], dtype=tl.int32) + n, mask=offs_p < P)
    tl.debug_barrier()
    offs = tl.arange(0, BLOCK_N)
    mask = offs < n
    expert = tl.load(ids_ptr + offs, mask=mask, other=0)
    rank = tl.atomic_add(scratch_ptr + expert, tl.full([BLOCK_N], 1, tl.int32), mask=mask)
    tl.debug_barrier()
    # volatile: the atomics updated L2; an L1 line from the zeroing store would be stale.
    counts = tl.load(scratch_ptr + offs_e, mask=mask_e, other=0, volatile=True)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)  # [BLOCK_E] one past each expert's padded run
    tl.store(scratch_ptr + E + offs_e, end - padded, mask=mask_e)
    total = tl.sum(padded, axis=0)
    tl.store(num_post_ptr, total)
    tl.debug_barrier()
    start = tl.load(scratch_ptr + E + expert, mask=mask, other=0, volatile=True)
    tl.store(sorted_ptr + start + rank, offs, mask=mask)
    end = tl.where(mask_e, end, 1 << 30)
    for b0 in range(0, NB, BLOCK_B):
        blk = b0 + tl.arange(0, BLOCK_B)
        row = blk * BLOCK_M
        # expert of a block = number of experts whose run ends at or before its first row
        owner = tl.sum((end[None, :] <= row[:, None]).to(tl.int32), axis=1)
        owner = tl.where(row < total, owner, -1)
        tl.store(expert_ids_ptr + blk, owner, mask=blk < NB)


ALIGN_MAX_ROWS = 4096
"""Above this many (token, slot) rows one program is too narrow: use the torch sort."""


def moe_align_triton(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``kernels.moe.moe_align_block_size`` (order inside a run may differ).
    ``pdl``: launched under PDL (``kernels.triton_impl.pdl``; the caller checks the device)."""
    # n flat (token, slot) rows, E experts, P padded rows, NB row blocks
    n = topk_ids.numel()
    assert 0 < n <= ALIGN_MAX_ROWS, n
    assert topk_ids.is_contiguous() and topk_ids.dtype == torch.int32, topk_ids.dtype
    dev = topk_ids.device
    p = -(-(n + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_ids = torch.empty(p, dtype=torch.int32, device=dev)  # [P]
    expert_ids = torch.empty(p // block_m, dtype=torch.int32, device=dev)  # [NB]
    num_post = torch.empty(1, dtype=torch.int32, device=dev)
    scratch = torch.empty(2 * num_experts, dtype=torch.int32, device=dev)
    _align_kernel[(1,)](
        topk_ids,
        sorted_ids,
        expert_ids,
        num_post,
        scratch,
        n,
        p,
        p // block_m,
        E=num_experts,
        BLOCK_M=block_m,
        BLOCK_N=next_pow2(n),
        BLOCK_E=next_pow2(num_experts),
        BLOCK_P=1024,
        BLOCK_B=64,
        PDL=pdl,
        num_warps=8 if n > 1024 else 4,
        launch_pdl=pdl,
    )
    return sorted_ids, expert_ids, num_post


@triton.jit
def _combine_kernel(
    down_ptr,
    add_ptr,
    out_ptr,
    D,
    K: tl.constexpr,
    HAS_ADD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(down_ptr + (t * K + j) * D + offs, mask=mask, other=0.0)
    out = acc.to(out_ptr.dtype.element_ty)
    if HAS_ADD:  # rounded like the unfused `moe_out + shared_out`
        add = tl.load(add_ptr + t * D + offs, mask=mask, other=0.0)
        out = (out.to(tl.float32) + add.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * D + offs, out, mask=mask)


def moe_combine_triton(
    down: torch.Tensor, dtype: torch.dtype, add: torch.Tensor | None, pdl: bool = False
) -> torch.Tensor:
    """down ``[T, k, D]`` fp32 per-slot outputs -> ``sum_k`` rounded to dtype (+ add);
    ``pdl`` as for ``moe_align_triton``."""
    # T tokens, k slots, D hidden
    t, k, d = down.shape
    assert down.is_contiguous() and down.dtype == torch.float32, (down.stride(), down.dtype)
    if add is not None:
        assert add.shape == (t, d) and add.is_contiguous() and add.dtype == dtype, add.shape
    out = torch.empty(t, d, dtype=dtype, device=down.device)  # [T, D]
    if t == 0:
        return out
    block = 1024
    _combine_kernel[(t, triton.cdiv(d, block))](
        down, down if add is None else add, out, d, K=k, HAS_ADD=add is not None, BLOCK_D=block,
        PDL=pdl, launch_pdl=pdl,
    )  # fmt: skip
    return out
