"""Split-K paged decode attention: every sequence has exactly one query.

Grid ``(B, Hkv, S)``: a program owns one sequence, one kv head and one slice of the context.
All query heads sharing that kv head ride in the same program as rows of one tile, so each key
is loaded once per group rather than once per query head (GQA packing). Splitting the context
over S programs keeps the GPU busy when B * Hkv is small and contexts are long.

The S partial results are merged by their log-sum-exp. By default (``FUSED_MERGE``) in the
same launch: every split program publishes its partial and arrives on a per-(sequence, kv
head) counter; the last to arrive merges the group's rows and puts the counter back to zero,
so the counters are zero between launches (CUDA-graph safe). Otherwise a second small kernel
merges.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import dot_precision, next_pow2, num_sms, use_pdl
from kernels.triton_impl.pdl import pdl_enter, pdl_launch, pdl_wait

_LOG2E = 1.4426950408889634

FUSED_MERGE = False
"""Merge the splits inside the split kernel (one launch: the last split of a (sequence, kv
head) to arrive merges) instead of in ``_decode_merge_kernel``. Off: on an H100 the 28B
batch-1 step replayed 0.057 ms slower with it (3.368 vs 3.311 ms, bench/decode_step_bench.py,
bench/RESULTS.md). Benchmarks flip it between graph captures."""

ONE_SPLIT_DIRECT = True
"""With one split per (sequence, kv head) (the split count the shapes give from ~66 sequences
up) the split kernel writes the output rows itself, as the merge would (its one weight is
exactly 1): no partials, no merge launch. Bit-identical; read at trace time."""

NUM_STAGES: int | None = None
"""Software-pipeline stages of the split kernel's key loop at every batch (for benchmarks);
None: `SMALL_BATCH_STAGES` at small batches, else Triton's default."""

SMALL_BATCH_BLOCK_N = 32
SMALL_BATCH_STAGES: int | None = 1
"""Keys a step of the split kernel's loop and its pipeline stages where the (sequence, kv
head) pairs are fewer than the SMs (b1: 32 keys unpipelined, step replay -0.025 ms on the
H200, the launch alone 4.8 vs 6.2 us); more pairs take 64 keys at Triton's default stages
(b256: the launch alone 99.9 us = 4.03 TB/s of KV, 0.94 of the copy rate)."""

EARLY_KV = True
"""The split kernel reads its metadata and first tile of keys before its PDL wait and only the
query and the step's own key after it (``_decode_split_kernel``); the merge kernel reads its
sequence's query range before its wait. Bit-identical; read at trace time. Only where the
launch is latency-bound (fewer (sequence, kv head) pairs than SMs, as for the 8 warps): the
early tile costs registers (109 against 80 a thread, sm_90), so programs a SM where the
launch is many waves of KV reads (``EARLY_KV_ALWAYS`` lifts the limit, for benchmarks)."""
EARLY_KV_ALWAYS = False

MIN_KEYS_PER_SPLIT = 256
"""Host side: ``default_num_splits`` gives each split at least this many keys of the block
table's width. Under CUDA graphs the table is as wide as the longest sequence could be, so
this rarely binds there; ``MIN_KEYS_PER_PROGRAM`` acts on each sequence's own length."""

MIN_KEYS_PER_PROGRAM = 0
"""Kernel side: a split program takes at least this many of its sequence's keys (then rounded
up to whole BLOCK_N tiles), so short contexts use fewer splits than the grid has; the rest
have nothing to do (fused: they return at once). 0: only the BLOCK_N rounding. A constexpr,
fixed per capture."""

COUNTER_SLOTS = 1 << 16
"""Arrival counters per device, one per (sequence, kv head); allocated once, never regrown
(a capture must not allocate). Bigger B * Hkv takes the two-kernel path."""
_COUNTERS: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _store_rows(out_ptr, q_start, stride_ot, stride_oh, heads, offs_d, x, mask):
    # x [BLOCK_G, BLOCK_D] fp32 -> the output rows of query token q_start, in out's dtype
    ptrs = out_ptr + q_start.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(ptrs, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_partial(
    part_out_ptr, part_lse_ptr, row, out, lse, offs_d, mask_g, mask_gd, D: tl.constexpr
):
    # One split's partial per head: out [BLOCK_G, BLOCK_D] and lse [BLOCK_G] at rows `row`
    tl.store(part_lse_ptr + row, lse, mask=mask_g)
    tl.store(part_out_ptr + row[:, None] * D + offs_d[None, :], out, mask=mask_gd)


@triton.jit
def _merge_head(
    part_out_ptr,
    part_lse_ptr,
    row0,  # the head's split-0 row
    num_active,
    offs_d,
    mask_d,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # sum_s out_s * w_s / sum_s w_s over the first num_active splits, w_s = 2^(lse_s - max lse),
    # as _decode_merge_kernel does (its extra splits are empty: weight 0). All splits in one
    # load each for lse and out (one L2 round trip, not one per split); ".cg": other programs
    # wrote these rows in this launch, a line in this SM's L1 could be stale.
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < num_active
    rows = row0 + offs_s
    lse = tl.load(part_lse_ptr + rows, mask=mask_s, other=float("-inf"), cache_modifier=".cg")
    part = tl.load(
        part_out_ptr + rows[:, None] * D + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
        cache_modifier=".cg",
    )  # [BLOCK_S, BLOCK_D]
    w = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 is never empty: the max is finite
    return tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)


@triton.jit
def _split_range(
    seq_len, split, NUM_SPLITS: tl.constexpr, MIN_KEYS: tl.constexpr, BLOCK_N: tl.constexpr
):
    # (lo, hi, splits with keys) of split `split` of a sequence. Split the sequence's own
    # context, not the table width: a CUDA graph is captured with tables as wide as the
    # longest sequence could be, and the work must still spread over the S programs. Each
    # split covers a whole number of BLOCK_N tiles, at least MIN_KEYS.
    split_len = tl.maximum(tl.cdiv(seq_len, NUM_SPLITS), MIN_KEYS)
    split_len = tl.cdiv(split_len, BLOCK_N) * BLOCK_N
    num_active = tl.cdiv(seq_len, split_len)  # >= 1 as seq_len >= 1
    lo = split * split_len
    return lo, tl.minimum(lo + split_len, seq_len), num_active


@triton.jit
def _publish_split(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    counter,  # this (sequence, kv head)'s arrival counter, zero between launches
    seq_heads,  # the sequence's first row of heads, b * HQ
    split,
    num_active,
    out,
    lse,
    q_start,
    stride_ot,
    stride_oh,
    head0,  # the group's first query head
    offs_d,
    mask_g,
    mask_gd,
    NUM_SPLITS: tl.constexpr,
    D: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # One split's result: written as the output rows when it is the whole context (the merge
    # would return it as is, w = 1; with one split this is static: no partials, no counter),
    # else published as a partial; the last split of the group to arrive merges, head by head.
    heads = head0 + tl.arange(0, BLOCK_G)
    first = (seq_heads + heads) * NUM_SPLITS  # [BLOCK_G] row of each head's split 0
    if NUM_SPLITS == 1 or num_active == 1:
        _store_rows(out_ptr, q_start, stride_ot, stride_oh, heads, offs_d, out, mask_gd)
    else:
        _store_partial(
            part_out_ptr, part_lse_ptr, first + split, out, lse, offs_d, mask_g, mask_gd, D
        )
        # Every thread's stores precede the arrival: the barrier orders them before the
        # one thread that does the (acq_rel, gpu-scope) atomic.
        tl.debug_barrier()
        if tl.atomic_add(counter, 1) == num_active - 1:  # the last to arrive merges
            tl.atomic_xchg(counter, 0)
            mask_d = offs_d < D
            row = out_ptr + q_start.to(tl.int64) * stride_ot
            for g in tl.static_range(GROUP):  # unrolled: the heads' loads overlap
                h = head0 + g
                merged = _merge_head(
                    part_out_ptr, part_lse_ptr, (seq_heads + h) * NUM_SPLITS, num_active,
                    offs_d, mask_d, D, BLOCK_S,
                )  # fmt: skip
                tl.store(
                    row + h * stride_oh + offs_d, merged.to(out_ptr.dtype.element_ty), mask=mask_d
                )


@triton.jit
def _kv_tile(
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,  # this sequence's block table row
    start,
    hi,
    below,  # keys at positions >= below are not read (left 0)
    kvh,
    offs_d,
    mask_d,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_CACHE: tl.constexpr,  # cache modifier of the K/V loads ("" or ".cg")
):
    # (k, v [BLOCK_N, BLOCK_D], their offsets, mask_n [BLOCK_N], positions) of the keys
    # [start, start + BLOCK_N) below hi of kv head kvh, through the block table
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] absolute key positions
    mask_n = pos < hi
    block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=mask_n, other=0)
    slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
    kv_off = slot[:, None] * (HKV * D) + kvh * D + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    kv_mask = (mask_n & (pos < below))[:, None] & mask_d[None, :]
    k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0, cache_modifier=KV_CACHE)
    v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0, cache_modifier=KV_CACHE)
    return k, v, kv_off, mask_n, pos


@triton.jit
def _attend_tile(q, k, v, mask_n, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    # one online-softmax step over a tile of keys (mask_n: the real ones); a tile with no
    # real key changes nothing (p = 0, alpha = 1)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, N]
    # The single query is the last position: every key below seq_len is visible.
    qk = tl.where(mask_n[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _softmax_init(BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    # A finite floor instead of -inf keeps exp2(m_old - m_new) free of (-inf) - (-inf) = nan.
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    return m_i, l_i, acc


@triton.jit
def _softmax_out(m_i, l_i, acc):
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
    return acc / tl.maximum(l_i, 1e-30)[:, None], lse


@triton.jit
def _attend_keys(
    q,  # [BLOCK_G, BLOCK_D] the query heads of kv head kvh
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,  # this sequence's block table row
    lo,
    hi,
    kvh,
    offs_d,
    mask_d,
    qk_scale,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_CACHE: tl.constexpr,  # cache modifier of the K/V loads ("" or ".cg")
):
    # (out [BLOCK_G, BLOCK_D] normalised, lse [BLOCK_G] log2-sum-exp) of the query rows over
    # the keys [lo, hi) of the sequence; lse is -inf where there are none.
    m_i, l_i, acc = _softmax_init(BLOCK_G, BLOCK_D)
    m_i, l_i, acc = _attend_from(
        q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_ptr, lo, hi, kvh, offs_d, mask_d,
        qk_scale, HKV, D, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, KV_CACHE,
    )  # fmt: skip
    return _softmax_out(m_i, l_i, acc)


@triton.jit
def _attend_from(
    q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_ptr, start, hi, kvh, offs_d, mask_d,
    qk_scale, HKV: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_CACHE: tl.constexpr,
):  # fmt: skip
    # the online softmax state carried over the key tiles [start, hi)
    for s0 in range(start, hi, BLOCK_N):
        k, v, _, mask_n, _ = _kv_tile(
            k_cache_ptr, v_cache_ptr, table_ptr, s0, hi, hi, kvh, offs_d, mask_d, HKV, D,
            BLOCK_SIZE, BLOCK_N, KV_CACHE,
        )  # fmt: skip
        m_i, l_i, acc = _attend_tile(q, k, v, mask_n, m_i, l_i, acc, qk_scale, DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qsl_ptr,
    part_out_ptr,
    part_lse_ptr,
    out_ptr,  # FUSED only
    count_ptr,  # FUSED only: [>= B * HKV] int32 arrival counters, zero between launches
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    stride_qt,
    stride_qh,
    stride_bt,
    stride_ot,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # KV cache block size (tokens per block)
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next_pow2(NUM_SPLITS)
    MIN_KEYS: tl.constexpr,
    FUSED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
    EARLY_KV: tl.constexpr,
):
    # EARLY_KV: everything but the query and the step's own key is in memory before this
    # step's kernels run (host copies, earlier steps), so the metadata and the first tile of
    # keys are read before the PDL wait, and the key at seq_len - 1 (written by the qkv
    # launch just before) after it, into its row of the tile: the same tile, bit for bit.
    if EARLY_KV:
        pdl_launch(PDL)
    else:
        pdl_enter(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if q_len == 0:  # an empty (padding) sequence owns no output row (all its programs leave)
        return
    seq_len = tl.load(seq_lens_ptr + b)
    lo, hi, num_active = _split_range(seq_len, split, NUM_SPLITS, MIN_KEYS, BLOCK_N)
    if FUSED and split >= num_active:  # nothing to do; the merge counts active splits only
        return

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_g  # [BLOCK_G] query heads of this kv head
    mask_g = offs_g < GROUP
    mask_d = offs_d < D
    mask_gd = mask_g[:, None] & mask_d[None, :]
    q_ptrs = q_ptr + q_start.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    table_ptr = block_tables_ptr + b * stride_bt
    m_i, l_i, acc = _softmax_init(BLOCK_G, BLOCK_D)
    start = lo
    if EARLY_KV:
        k, v, kv_off, mask_n, pos = _kv_tile(
            k_cache_ptr, v_cache_ptr, table_ptr, lo, hi, seq_len - 1, kvh, offs_d, mask_d,
            HKV, D, BLOCK_SIZE, BLOCK_N, "",
        )  # fmt: skip
        pdl_wait(PDL)
    q = tl.load(q_ptrs, mask=mask_gd, other=0.0)  # [BLOCK_G, BLOCK_D]
    if EARLY_KV:  # the step's own key into its row, then the tile as the loop would take it
        new = ((pos == seq_len - 1) & mask_n)[:, None] & mask_d[None, :]
        k = tl.where(new, tl.load(k_cache_ptr + kv_off, mask=new, other=0.0), k)
        v = tl.where(new, tl.load(v_cache_ptr + kv_off, mask=new, other=0.0), v)
        m_i, l_i, acc = _attend_tile(q, k, v, mask_n, m_i, l_i, acc, qk_scale, DOT_PRECISION)
        start = lo + BLOCK_N
    m_i, l_i, acc = _attend_from(
        q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_ptr, start, hi, kvh, offs_d, mask_d,
        qk_scale, HKV, D, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, "",
    )  # fmt: skip
    out, lse = _softmax_out(m_i, l_i, acc)
    first = (b * HQ + heads) * NUM_SPLITS  # [BLOCK_G] row of each head's split 0
    if FUSED:
        _publish_split(
            part_out_ptr, part_lse_ptr, out_ptr, count_ptr + b * HKV + kvh, b * HQ, split,
            num_active, out, lse, q_start, stride_ot, stride_oh, kvh * GROUP, offs_d, mask_g,
            mask_gd, NUM_SPLITS, D, GROUP, BLOCK_G, BLOCK_S,
        )  # fmt: skip
    else:
        _store_partial(
            part_out_ptr, part_lse_ptr, first + split, out, lse, offs_d, mask_g, mask_gd, D
        )


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    qsl_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    HQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
    EARLY_KV: tl.constexpr,
):
    # EARLY_KV: the query range (a host copy) is read before the PDL wait
    if EARLY_KV:
        pdl_launch(PDL)
    else:
        pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_start = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) == q_start:
        return
    if EARLY_KV:
        pdl_wait(PDL)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < D
    row = (b * HQ + h) * NUM_SPLITS + offs_s  # [BLOCK_S]
    lse = tl.load(part_lse_ptr + row, mask=mask_s, other=float("-inf"))
    part = tl.load(
        part_out_ptr + row[:, None] * D + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    # Split 0 is never empty (seq_len >= 1), so the max is finite.
    w = tl.exp2(lse - tl.max(lse, axis=0))  # [BLOCK_S]
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    out_ptrs = out_ptr + q_start.to(tl.int64) * stride_ot + h * stride_oh + offs_d
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def default_num_splits(
    batch: int, num_kv_heads: int, max_context: int, device: torch.device
) -> int:
    """Enough programs to fill the GPU twice over, but at least ``MIN_KEYS_PER_SPLIT`` keys
    of ``max_context`` per split.

    Computed from shapes only (no device sync), so it is fixed for a CUDA-graph bucket.
    """
    by_occupancy = -(-2 * num_sms(device) // max(1, batch * num_kv_heads))
    by_length = -(-max_context // max(1, MIN_KEYS_PER_SPLIT))
    return max(1, min(by_occupancy, by_length, 32))


def zeroed_counters(
    store: dict[torch.device, torch.Tensor], device: torch.device, n: int
) -> torch.Tensor | None:
    """``store``'s int32 counters for ``device`` (``n`` of them, made zero once; every launch
    that uses them leaves them zero). None inside a CUDA-graph capture before an eager call
    has made them: a buffer allocated there would be zero-filled only when the graph
    replays, so the caller takes a path without counters."""
    buf = store.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = store[device] = torch.zeros(n, dtype=torch.int32, device=device)
    return buf


def _counters(device: torch.device) -> torch.Tensor | None:
    """Per-(sequence, kv head) arrival counters of the fused merge."""
    return zeroed_counters(_COUNTERS, device, COUNTER_SLOTS)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Decode attention (one query per sequence); same contract as ``paged_attention``.

    Tiles from the H100 sweep in bench/gpu_bench.py (--attention-sweep): 8 warps when there
    are fewer (sequence, kv head) pairs than SMs (b1 ctx512: 10.4 us vs 12.3 for the old 32 x
    4 warps), else 4 (b256 ctx768: 152 us vs 172); keys a step and stages as
    ``SMALL_BATCH_BLOCK_N`` / ``SMALL_BATCH_STAGES`` say (H200, session 11)."""
    # T tokens (== B), Hq/Hkv heads, D head dim, S splits
    t, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    b, max_blocks = block_tables.shape
    assert t == b, f"decode needs one query per sequence: T={t}, B={b}"
    assert q.stride(2) == 1, f"q's head dim must be contiguous: {q.stride()}"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.stride(1) == 1 and seq_lens.is_contiguous()
    assert query_start_loc.is_contiguous()
    out = torch.empty_like(q)  # [T, Hq, D]
    if t == 0:
        return out
    max_context = max_blocks * block_size
    sms = num_sms(q.device)
    if num_warps is None:
        num_warps = 8 if b * hkv < sms else 4
    small = b * hkv < sms
    if block_n is None:
        block_n = SMALL_BATCH_BLOCK_N if small else 64
    stages = NUM_STAGES if NUM_STAGES is not None or not small else SMALL_BATCH_STAGES
    early = EARLY_KV and (EARLY_KV_ALWAYS or b * hkv < sms)
    if num_splits is None:
        num_splits = default_num_splits(b, hkv, max_context, q.device)
    counters = None
    if FUSED_MERGE and b * hkv <= COUNTER_SLOTS and num_splits > 1:
        counters = _counters(q.device)
    # one split: the split kernel stores the rows (statically: no counter is touched)
    fused = counters is not None or ((ONE_SPLIT_DIRECT or FUSED_MERGE) and num_splits == 1)
    # partials; one split stored straight as rows writes none (placeholders of their dtype)
    shape = (1, 1, 1) if fused and num_splits == 1 else (b, hq, num_splits)
    part_out = torch.empty(*shape, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(*shape, dtype=torch.float32, device=q.device)
    group = hq // hkv
    pdl = use_pdl(q)
    _decode_split_kernel[(b, hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        part_out,
        part_lse,
        out,
        seq_lens if counters is None else counters,  # placeholder pointer when unused
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        NUM_SPLITS=num_splits,
        HQ=hq,
        HKV=hkv,
        GROUP=group,
        D=d,
        BLOCK_SIZE=block_size,
        BLOCK_G=max(16, next_pow2(group)),
        BLOCK_N=block_n,
        BLOCK_D=max(16, next_pow2(d)),
        BLOCK_S=next_pow2(num_splits),
        MIN_KEYS=MIN_KEYS_PER_PROGRAM,
        FUSED=fused,
        DOT_PRECISION=dot_precision(q.dtype),
        PDL=pdl,
        EARLY_KV=early,
        num_warps=num_warps,
        launch_pdl=pdl,
        **({} if stages is None else {"num_stages": stages}),
    )
    if fused:
        return out
    _decode_merge_kernel[(b, hq)](
        part_out,
        part_lse,
        query_start_loc,
        out,
        out.stride(0),
        out.stride(1),
        NUM_SPLITS=num_splits,
        HQ=hq,
        D=d,
        BLOCK_S=next_pow2(num_splits),
        BLOCK_D=next_pow2(d),
        PDL=pdl,
        EARLY_KV=early,
        launch_pdl=pdl,
    )
    return out
