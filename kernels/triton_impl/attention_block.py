"""Triton kernel for :func:`kernels.attention_block.attention_block`: a decoder layer's whole
attention half for one decode token in one persistent launch.

Grid: ``PROGRAMS_PER_SM`` programs a SM (at most what a SM holds of the compiled kernel), all
resident at once. Four phases, separated by grid barriers:

1. input RMSNorm (+ residual add), every program for itself (the row is 5 KB), then the qkv
   projection over the programs' share of weight tiles, with the rotary embedding and the
   K/V cache write in each tile's epilogue (as ``_qkv_rope_kernel``);
2. split-K decode attention over ``HKV * NUM_SPLITS`` programs (as ``_decode_split_kernel``),
   each writing its partial; meanwhile every program reads its first ``o_proj`` tile, since
   weights are never written during a step;
3. program h merges head h's splits (one L2 round trip);
4. ``o_proj`` over the programs' share of weight tiles.

Five launches become one, and the hops between them grid barriers (~1 us each on an H100).
The barrier is the classic self-resetting one: program 0 adds ``2^31 - (P - 1)``, the others
1, so the counter's top bit flips once all P have arrived and its value is back where it was
after every launch (graph-safe). Programs never return before a barrier. Measured on an H100
(bench/attention_block_bench.py, RESULTS.md): what mattered was the merge (the last split
merging its group head after head cost ~6 us of dependent L2 round trips) and polling (one
thread a program, backing off); asking the L2 for the o_proj rows during the attention phase
cost 2.4 us a block.

The interpreter runs programs one after another, so a barrier there would never open:
``PHASE`` 1 to 4 run one phase per launch (the wrapper launches all four in order), and
``PHASE`` 0 (the GPU) runs them all in one launch with the barriers between.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels._dispatch import dot_precision, interpreting, next_pow2, num_sms, use_pdl
from kernels.triton_impl.attention_decode import (
    _LOG2E,
    _attend_keys,
    _merge_head,
    _split_range,
    _store_partial,
    zeroed_counters,
)
from kernels.triton_impl.pdl import pdl_launch, pdl_wait
from kernels.triton_impl.rms_norm import add_residual, rms_apply, rms_rstd

BLOCK_N_QKV = 4
"""qkv weight rows a tile (even, divides the head dim: a tile's rotary pairs are whole)."""
BLOCK_N_O = 4
"""o_proj weight rows a tile."""
NUM_WARPS = 4
PROGRAMS_PER_SM = 2
"""Programs a SM (capped at what one SM holds of the compiled kernel)."""
NUM_SPLITS = 32
EARLY_LAUNCH = True
"""Launch under PDL (scheduled while the kernel before still runs, as every decode kernel is).
Off: the launch waits for that kernel to drain, so the resident programs do not take SM room
from it."""
"""Attention splits a kv head (``HKV * NUM_SPLITS`` must not exceed the programs)."""


# Thread 0 of the program polls the counter (relaxed loads, backing off between them) until
# its top bit differs from `old`'s; the other threads wait at the CTA barrier after. One poller
# a program: hundreds of warps polling one L2 line starve every other access to that L2 slice.
_SPIN = tl.constexpr("""{
    .reg .pred p, q;
    .reg .b32 v, t;
    mov.u32 t, %tid.x;
    setp.ne.u32 q, t, 0;
    @q bra DONE;
    SPIN:
    ld.relaxed.gpu.global.b32 v, [$1];
    xor.b32 v, v, $2;
    setp.ge.s32 p, v, 0;
    @!p bra DONE;
    nanosleep.u32 64;
    bra SPIN;
    DONE:
    mov.u32 $0, 0;
}""")


@triton.jit
def _grid_barrier(bar_ptr, inc):
    # Every thread's writes precede the arrival (CTA barrier, then one gpu-scope release);
    # wait for the counter's top bit to flip; the acquire orders the reads that follow.
    tl.debug_barrier()
    old = tl.atomic_add(bar_ptr, inc, sem="release", scope="gpu")
    tl.inline_asm_elementwise(
        _SPIN, "=r,l,r", [bar_ptr, old], dtype=tl.int32, is_pure=False, pack=1
    )
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _stamp(times_ptr, pid, k: tl.constexpr, TIMED: tl.constexpr):
    # benchmarks: the global timer (ns) at point k of program pid
    if TIMED:
        now = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=tl.int64, is_pure=False, pack=1
        )
        tl.store(times_ptr + pid * 8 + k, now)


@triton.jit
def _attention_block_kernel(
    h_ptr,
    res_ptr,
    g_ptr,
    res_out_ptr,
    wqkv_ptr,
    bqkv_ptr,
    qkv_ptr,
    table_ptr,
    rows_ptr,
    slot_ptr,
    k_cache_ptr,
    v_cache_ptr,
    bt_ptr,
    seq_lens_ptr,
    qsl_ptr,
    part_out_ptr,
    part_lse_ptr,
    attn_ptr,
    wo_ptr,
    bo_ptr,
    out_ptr,
    sync_ptr,  # int32 [1]: the grid barrier's counter
    times_ptr,  # TIMED: int64 [P, 8] phase timestamps
    eps,
    qk_scale,  # softmax scale * log2(e)
    nprog,  # P, the grid
    barrier_inc,  # program 0 adds 2^31 - (P - 1) (this), the others 1
    HIDDEN: tl.constexpr,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,  # next_pow2(HIDDEN)
    BLOCK_A: tl.constexpr,  # next_pow2(HQ * D)
    BN_QKV: tl.constexpr,
    BN_O: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next_pow2(NUM_SPLITS)
    HAS_RESIDUAL: tl.constexpr,
    HAS_QKV_BIAS: tl.constexpr,
    HAS_O_BIAS: tl.constexpr,
    PHASE: tl.constexpr,  # 0: all, with grid barriers (GPU); 1 to 4: that phase alone
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
    TIMED: tl.constexpr,
):
    pid = tl.program_id(0)
    inc = tl.where(pid == 0, barrier_inc, 1)
    N_QKV: tl.constexpr = (HQ + 2 * HKV) * D
    K_O: tl.constexpr = HQ * D
    GROUP: tl.constexpr = HQ // HKV

    # ---- phase 1: norm, qkv projection, rotary, cache write
    if PHASE == 0 or PHASE == 1:
        offs_k = tl.arange(0, BLOCK_H)
        mask_k = offs_k < HIDDEN
        n_tiles: tl.constexpr = N_QKV // BN_QKV
        offs_t = tl.arange(0, BN_QKV)
        # the first tile's weights before the wait: never written during a step
        w = tl.load(
            wqkv_ptr + (pid * BN_QKV + offs_t).to(tl.int64)[:, None] * HIDDEN + offs_k[None, :],
            mask=(pid < n_tiles) & mask_k[None, :],
            other=0.0,
        )
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0)
        pdl_launch(PDL)
        pdl_wait(PDL)
        _stamp(times_ptr, pid, 0, TIMED)
        x = tl.load(h_ptr + offs_k, mask=mask_k, other=0.0)
        if HAS_RESIDUAL:
            x = add_residual(x, tl.load(res_ptr + offs_k, mask=mask_k, other=0.0))
            if pid == 0:
                tl.store(res_out_ptr + offs_k, x, mask=mask_k)
        xn = rms_apply(x, rms_rstd(x, eps, HIDDEN), g).to(tl.float32)  # [BLOCK_H]
        _stamp(times_ptr, pid, 1, TIMED)
        row = tl.load(rows_ptr).to(tl.int64)
        slot = tl.load(slot_ptr)
        t = pid
        while t < n_tiles:  # (a while: the interpreter cannot range from a program id)
            nxt = t + nprog
            w_next = tl.load(
                wqkv_ptr + (nxt * BN_QKV + offs_t).to(tl.int64)[:, None] * HIDDEN + offs_k[None, :],
                mask=(nxt < n_tiles) & mask_k[None, :],
                other=0.0,
            )
            n0 = t * BN_QKV
            acc = tl.sum(w.to(tl.float32) * xn[None, :], axis=1)  # [BN_QKV]
            if HAS_QKV_BIAS:
                acc += tl.load(bqkv_ptr + n0 + offs_t).to(tl.float32)
            y = acc.to(qkv_ptr.dtype.element_ty)  # rounded as the linear's output, then rotated
            half: tl.constexpr = BN_QKV // 2
            a, b = tl.split(tl.reshape(y.to(tl.float32), [half, 2]))  # even, odd columns
            pair = (n0 % D) // 2 + tl.arange(0, half)
            cos = tl.load(table_ptr + row * D + pair)
            sin = tl.load(table_ptr + row * D + D // 2 + pair)
            rot = tl.reshape(tl.join(a * cos - b * sin, b * cos + a * sin), [BN_QKV])
            y = tl.where(n0 < (HQ + HKV) * D, rot.to(qkv_ptr.dtype.element_ty), y)
            tl.store(qkv_ptr + n0 + offs_t, y)
            if n0 >= HQ * D and slot >= 0:  # k or v columns: into the cache row of the slot
                c = n0 - HQ * D + offs_t  # column within [k | v]
                if n0 >= (HQ + HKV) * D:
                    dst = v_cache_ptr + slot * (HKV * D) + c - HKV * D
                else:
                    dst = k_cache_ptr + slot * (HKV * D) + c
                tl.store(dst, y.to(k_cache_ptr.dtype.element_ty))
            w = w_next
            t = nxt
        _stamp(times_ptr, pid, 2, TIMED)

    if PHASE == 0:
        _grid_barrier(sync_ptr, inc)
        _stamp(times_ptr, pid, 3, TIMED)

    offs_a = tl.arange(0, BLOCK_A)
    mask_a = offs_a < K_O
    offs_o = tl.arange(0, BN_O)
    n_tiles_o: tl.constexpr = HIDDEN // BN_O
    if PHASE == 0 or PHASE == 4:
        # this program's first o_proj tile now: weights are never written during a step
        wo = tl.load(
            wo_ptr + (pid * BN_O + offs_o).to(tl.int64)[:, None] * K_O + offs_a[None, :],
            mask=(pid < n_tiles_o) & mask_a[None, :],
            other=0.0,
        )

    # ---- phase 2: split-K attention: each split's partial (out, lse) of its group's heads
    if PHASE == 0 or PHASE == 2:
        q_start = tl.load(qsl_ptr)
        q_len = tl.load(qsl_ptr + 1) - q_start
        if pid < HKV * NUM_SPLITS and q_len > 0:
            kvh = pid // NUM_SPLITS
            split = pid % NUM_SPLITS
            lo, hi, num_active = _split_range(tl.load(seq_lens_ptr), split, NUM_SPLITS, 0, BLOCK_N)
            if split < num_active:
                offs_g = tl.arange(0, BLOCK_G)
                offs_d = tl.arange(0, BLOCK_D)
                heads = kvh * GROUP + offs_g
                mask_g = offs_g < GROUP
                mask_d = offs_d < D
                mask_gd = mask_g[:, None] & mask_d[None, :]
                # q was written by other programs in phase 1: past the L1
                q = tl.load(
                    qkv_ptr + heads[:, None] * D + offs_d[None, :],
                    mask=mask_gd,
                    other=0.0,
                    cache_modifier=".cg",
                )
                out, lse = _attend_keys(
                    q, k_cache_ptr, v_cache_ptr, bt_ptr, lo, hi, kvh, offs_d, mask_d, qk_scale,
                    HKV, D, BLOCK_SIZE, BLOCK_G, BLOCK_N, BLOCK_D, DOT_PRECISION, ".cg",
                )  # fmt: skip
                _stamp(times_ptr, pid, 7, TIMED)
                _store_partial(
                    part_out_ptr, part_lse_ptr, heads * NUM_SPLITS + split, out, lse, offs_d,
                    mask_g, mask_gd, D,
                )  # fmt: skip

    _stamp(times_ptr, pid, 4, TIMED)
    if PHASE == 0:
        _grid_barrier(sync_ptr, inc)

    # ---- phase 3: program h merges head h's splits (one load each of lse and out: one L2
    # round trip; the last split merging its group's heads one after another took ~6 us)
    if PHASE == 0 or PHASE == 3:
        q_start = tl.load(qsl_ptr)
        if pid < HQ and tl.load(qsl_ptr + 1) > q_start:
            _, _, num_active = _split_range(tl.load(seq_lens_ptr), 0, NUM_SPLITS, 0, BLOCK_N)
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            merged = _merge_head(
                part_out_ptr, part_lse_ptr, pid * NUM_SPLITS, num_active, offs_d, mask_d, D, BLOCK_S
            )
            tl.store(attn_ptr + pid * D + offs_d, merged.to(attn_ptr.dtype.element_ty), mask=mask_d)

    if PHASE == 0:
        _grid_barrier(sync_ptr, inc)
        _stamp(times_ptr, pid, 5, TIMED)

    # ---- phase 4: o_proj
    if PHASE == 0 or PHASE == 4:
        att = tl.load(attn_ptr + offs_a, mask=mask_a, other=0.0, cache_modifier=".cg")
        att = att.to(tl.float32)
        t = pid
        while t < n_tiles_o:
            nxt = t + nprog
            wo_next = tl.load(
                wo_ptr + (nxt * BN_O + offs_o).to(tl.int64)[:, None] * K_O + offs_a[None, :],
                mask=(nxt < n_tiles_o) & mask_a[None, :],
                other=0.0,
            )
            acc = tl.sum(wo.to(tl.float32) * att[None, :], axis=1)  # [BN_O]
            if HAS_O_BIAS:
                acc += tl.load(bo_ptr + t * BN_O + offs_o).to(tl.float32)
            tl.store(out_ptr + t * BN_O + offs_o, acc.to(out_ptr.dtype.element_ty))
            wo = wo_next
            t = nxt
        _stamp(times_ptr, pid, 6, TIMED)


_SYNC: dict[torch.device, torch.Tensor] = {}
SYNC_SLOTS = 32  # one 128-byte line: the barrier alone on it


def sync_buffer(device: torch.device) -> torch.Tensor | None:
    """The per-device grid-barrier counter (see ``zeroed_counters``: None means take the
    chain of separate kernels)."""
    return zeroed_counters(_SYNC, device, SYNC_SLOTS)


_RESIDENT: dict[tuple, int] = {}


def _resident_per_sm(compiled: Any, device: torch.device) -> int:
    """Programs of a compiled kernel one SM holds at once (registers, shared memory, warps):
    a grid barrier needs every program resident, so the grid never exceeds this x SMs."""
    props = torch.cuda.get_device_properties(device)
    if not hasattr(compiled, "n_regs"):
        compiled._init_handles()  # loads the binary: sets n_regs (triton 3.6)
    if not hasattr(compiled, "n_regs"):
        return 1  # unknown: one a SM always fits
    warps = compiled.metadata.num_warps
    regs = max(1, compiled.n_regs) * 32 * warps
    by_regs = props.regs_per_multiprocessor // regs
    by_warps = props.max_threads_per_multi_processor // (32 * warps)
    smem = compiled.metadata.shared
    by_smem = props.shared_memory_per_multiprocessor // smem if smem else by_warps
    return max(1, min(by_regs, by_warps, by_smem))


def num_programs(device: torch.device, key: tuple | None = None) -> int:
    """The grid: ``PROGRAMS_PER_SM`` a SM, at most what one SM holds of the compiled kernel
    (``key``: its constexpr settings, once ``attention_block_triton`` has compiled it)."""
    per_sm = PROGRAMS_PER_SM
    if key is not None and key in _RESIDENT:
        per_sm = min(per_sm, _RESIDENT[key])
    return per_sm * num_sms(device)


def attention_block_triton(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    o_weight: torch.Tensor,
    o_bias: torch.Tensor | None,
    num_heads: int,
    num_kv_heads: int,
    table: torch.Tensor,
    rows: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sync: torch.Tensor,
    times: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes are checked by ``kernels.attention_block.attention_block``; returns
    (o_proj output ``[1, D]``, residual ``[1, D]``)."""
    # D hidden, Dh head dim, N = (Hq + 2 Hkv) Dh
    hidden = h.shape[1]
    d = table.shape[1]
    n_qkv = qkv_weight.shape[0]
    # one program a SM always fits, so the splits never outnumber the programs
    splits = max(1, min(NUM_SPLITS, num_sms(h.device) // num_kv_heads))
    qkv = torch.empty(1, n_qkv, dtype=h.dtype, device=h.device)
    attn = torch.empty(1, num_heads * d, dtype=h.dtype, device=h.device)
    out = torch.empty(1, hidden, dtype=h.dtype, device=h.device)
    res_out = h if residual is None else torch.empty_like(h)
    part_out = torch.empty(num_heads, splits, d, dtype=torch.float32, device=h.device)
    part_lse = torch.empty(num_heads, splits, dtype=torch.float32, device=h.device)
    pdl = use_pdl(h)
    args = (
        h,
        h if residual is None else residual,
        norm_weight,
        res_out,
        qkv_weight,
        qkv_weight if qkv_bias is None else qkv_bias,
        qkv,
        table,
        rows,
        slot_mapping,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        part_out,
        part_lse,
        attn,
        o_weight,
        o_weight if o_bias is None else o_bias,
        out,
        sync,
        sync if times is None else times,
        eps,
        scale * _LOG2E,
    )
    consts = dict(
        HIDDEN=hidden,
        HQ=num_heads,
        HKV=num_kv_heads,
        D=d,
        BLOCK_H=next_pow2(hidden),
        BLOCK_A=next_pow2(num_heads * d),
        BN_QKV=BLOCK_N_QKV,
        BN_O=BLOCK_N_O,
        NUM_SPLITS=splits,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_G=max(16, next_pow2(num_heads // num_kv_heads)),
        BLOCK_N=64,
        BLOCK_D=max(16, next_pow2(d)),
        BLOCK_S=next_pow2(splits),
        HAS_RESIDUAL=residual is not None,
        HAS_QKV_BIAS=qkv_bias is not None,
        HAS_O_BIAS=o_bias is not None,
        DOT_PRECISION=dot_precision(h.dtype),
        PDL=pdl,
        TIMED=times is not None,
        num_warps=NUM_WARPS,
    )
    if interpreting():
        programs = num_programs(h.device)
        for phase in (1, 2, 3, 4):  # a barrier would never open: one launch a phase
            _attention_block_kernel[(programs,)](
                *args, programs, (1 << 31) - (programs - 1), PHASE=phase, **consts
            )
        return out, res_out
    key = (h.device, *sorted(consts.items()))
    if key not in _RESIDENT:  # compile (no launch) to learn how many programs fit a SM
        guess = num_programs(h.device)  # the same integer specialisation as the launch
        compiled = _attention_block_kernel.warmup(
            *args, guess, (1 << 31) - (guess - 1), PHASE=0, **consts, grid=(1,)
        )
        _RESIDENT[key] = _resident_per_sm(compiled, h.device)
    programs = num_programs(h.device, key)
    _attention_block_kernel[(programs,)](
        *args, programs, (1 << 31) - (programs - 1), PHASE=0, **consts,
        launch_pdl=pdl and EARLY_LAUNCH,
    )  # fmt: skip
    return out, res_out
