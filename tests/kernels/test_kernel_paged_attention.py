"""Paged attention: reference vs dense SDPA, and both Triton kernels vs the reference."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from kernels import paged_attention, paged_attention_ref, write_kv
from kernels._dispatch import interpreting, triton_available

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)

TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


@dataclass
class Batch:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [N, S, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, M] int32
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B+1] int32

    def args(self) -> tuple[torch.Tensor, ...]:
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.seq_lens,
            self.query_start_loc,
        )


def make_batch(
    seq_lens: list[int],
    q_lens: list[int],
    hq: int,
    hkv: int,
    d: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
) -> Batch:
    """Random cache contents, block tables drawn from a shuffled pool (one spare column)."""
    b = len(seq_lens)
    max_blocks = max(-(-s // block_size) for s in seq_lens) + 1
    num_blocks = b * max_blocks + 3
    tables = torch.randperm(num_blocks)[: b * max_blocks].view(b, max_blocks).int()
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return Batch(
        q=torch.randn(int(qsl[-1]), hq, d).to(dtype),
        k_cache=torch.randn(num_blocks, block_size, hkv, d).to(dtype),
        v_cache=torch.randn(num_blocks, block_size, hkv, d).to(dtype),
        block_tables=tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=qsl,
    )


def dense_sdpa(batch: Batch, scale: float) -> torch.Tensor:
    """Independent check: per-position gather of the cache, then SDPA with a causal mask."""
    hq, hkv = batch.q.shape[1], batch.k_cache.shape[2]
    bs = batch.k_cache.shape[1]
    outs = []
    for b, seq_len in enumerate(batch.seq_lens.tolist()):
        lo, hi = batch.query_start_loc[b].item(), batch.query_start_loc[b + 1].item()
        pos = torch.arange(seq_len)
        blocks = batch.block_tables[b, pos // bs].long()
        k = batch.k_cache[blocks, pos % bs].float()  # [L, Hkv, D]
        v = batch.v_cache[blocks, pos % bs].float()
        q = batch.q[lo:hi].float()
        q_pos = torch.arange(seq_len - (hi - lo), seq_len)
        mask = pos[None, :] <= q_pos[:, None]  # [q_len, L]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1).repeat_interleave(hq // hkv, 0),
            v.transpose(0, 1).repeat_interleave(hq // hkv, 0),
            attn_mask=mask,
            scale=scale,
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs).to(batch.q.dtype)


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (4, 2), (6, 2), (5, 1)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_reference_matches_dense_sdpa(hq: int, hkv: int, block_size: int) -> None:
    batch = make_batch([9, 1, 20, 6], [9, 1, 3, 1], hq, hkv, 16, block_size)
    ref = paged_attention_ref(*batch.args(), scale=0.25)
    torch.testing.assert_close(ref, dense_sdpa(batch, 0.25), atol=1e-5, rtol=1e-5)


def test_write_then_attend_matches_dense_attention() -> None:
    """write_kv + paged_attention over a fresh prompt equals plain causal attention."""
    t, hq, hkv, d, bs = 11, 4, 2, 16, 4
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    k_cache, v_cache = torch.zeros(8, bs, hkv, d), torch.zeros(8, bs, hkv, d)
    table = torch.tensor([[5, 2, 7]], dtype=torch.int32)
    pos = torch.arange(t)
    write_kv(k, v, k_cache, v_cache, (table[0, pos // bs] * bs + pos % bs).long())
    out = paged_attention(
        q,
        k_cache,
        v_cache,
        table,
        torch.tensor([t], dtype=torch.int32),
        torch.tensor([0, t], dtype=torch.int32),
        scale=0.3,
    )
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        is_causal=True,
        scale=0.3,
        enable_gqa=True,
    ).transpose(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize(
    ("hq", "hkv", "d", "block_size", "dtype", "num_splits"),
    [
        (4, 4, 16, 4, torch.float32, 1),
        (4, 2, 32, 16, torch.float16, 3),
        (8, 2, 24, 3, torch.float32, 4),  # odd block size, head dim not a power of two
        (5, 1, 16, 8, torch.float16, 1),  # odd group
        (3, 3, 16, 1, torch.float32, 2),
        (4, 2, 16, 4, torch.float32, None),  # the shape-derived default
    ],
)
def test_decode_kernel(
    hq: int, hkv: int, d: int, block_size: int, dtype: torch.dtype, num_splits: int | None
) -> None:
    batch = make_batch([1, 37, 12, 45, 5], [1] * 5, hq, hkv, d, block_size, dtype)
    ref = paged_attention_ref(*batch.args(), scale=d**-0.5)
    out = paged_attention(*batch.args(), scale=d**-0.5, impl="triton", num_splits=num_splits)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


@needs_triton
@pytest.mark.parametrize(
    ("hq", "hkv", "d", "block_size", "dtype"),
    [
        (4, 4, 16, 4, torch.float32),
        (4, 2, 32, 16, torch.float16),
        (8, 2, 24, 3, torch.float32),
        (5, 1, 16, 8, torch.float16),
        (6, 2, 16, 1, torch.float32),  # group of 3: tile rows are not a power of two per query
    ],
)
def test_prefill_kernel_mixed_batch(
    hq: int, hkv: int, d: int, block_size: int, dtype: torch.dtype
) -> None:
    """Fresh prompts, chunks with cached context, and decode steps in one call."""
    batch = make_batch([13, 40, 1, 21, 9], [13, 17, 1, 1, 4], hq, hkv, d, block_size, dtype)
    ref = paged_attention_ref(*batch.args(), scale=d**-0.5)
    out = paged_attention(*batch.args(), scale=d**-0.5, impl="triton")
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


@needs_triton
@pytest.mark.parametrize(("block_m", "block_n"), [(16, 16), (32, 64)])
def test_prefill_kernel_tile_sizes(block_m: int, block_n: int) -> None:
    from kernels.triton_impl.attention_prefill import paged_attention_prefill

    batch = make_batch([30, 7, 19], [30, 2, 11], 6, 2, 16, 4)
    ref = paged_attention_ref(*batch.args(), scale=0.2)
    out = paged_attention_prefill(*batch.args(), scale=0.2, block_m=block_m, block_n=block_n)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@needs_triton
@pytest.mark.parametrize("decode", [True, False])
def test_strided_q_from_fused_qkv(decode: bool) -> None:
    """q as a view into a fused qkv projection (token stride > Hq * D) works unchanged."""
    q_lens = [1, 1, 1] if decode else [5, 1, 3]
    batch = make_batch([6, 18, 3], q_lens, 4, 2, 16, 4)
    qkv = torch.randn(batch.q.shape[0], 8 * 16)
    qkv[:, : 4 * 16] = batch.q.reshape(batch.q.shape[0], -1)
    batch.q = qkv[:, : 4 * 16].view(-1, 4, 16)
    assert not batch.q.is_contiguous()
    ref = paged_attention_ref(*batch.args(), scale=0.25)
    out = paged_attention(*batch.args(), scale=0.25, impl="triton")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------- fused split + merge
def _decode(batch: Batch, monkeypatch: pytest.MonkeyPatch, fused: bool, **kw) -> torch.Tensor:
    from kernels.triton_impl import attention_decode as ad

    monkeypatch.setattr(ad, "FUSED_MERGE", fused)
    monkeypatch.setattr(ad, "ONE_SPLIT_DIRECT", fused)  # unfused: the merge kernel even at one
    return ad.paged_attention_decode(*batch.args(), scale=batch.q.shape[-1] ** -0.5, **kw)


def _counters_cpu() -> torch.Tensor:
    from kernels.triton_impl import attention_decode as ad

    # none allocated: no launch used them (one split stores its rows without a counter)
    return ad._COUNTERS.get(torch.device("cpu"), torch.zeros(1, dtype=torch.int32))


def _no_merge_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused path must be one launch: any use of the merge kernel fails the test."""
    from kernels.triton_impl import attention_decode as ad

    class Forbidden:
        def __getitem__(self, grid: object) -> None:
            raise AssertionError("the fused path launched _decode_merge_kernel")

    monkeypatch.setattr(ad, "_decode_merge_kernel", Forbidden())


def _with_empty(batch: Batch, empty: list[int]) -> Batch:
    """Give sequences `empty` q_len 0, keeping T == B (their q rows are left unused at the end):
    the decode kernel must write no row for them and leave their counters at zero."""
    b = batch.seq_lens.shape[0]
    q_lens = torch.tensor([0 if i in empty else 1 for i in range(b)])
    batch.query_start_loc = torch.cat([torch.zeros(1), q_lens.cumsum(0)]).int()
    return batch


def _ref_rows(batch: Batch) -> tuple[torch.Tensor, int]:
    n = int(batch.query_start_loc[-1])
    ref = paged_attention_ref(
        batch.q[:n],
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        scale=batch.q.shape[-1] ** -0.5,
    )
    return ref, n


FUSED_CASES = [
    # hq, hkv, d, block_size, dtype, num_splits, block_n, min_keys
    (4, 4, 16, 4, torch.float32, 1, 16, 0),  # one split: direct write, no counter
    (4, 2, 32, 16, torch.float16, 2, 16, 0),
    (8, 2, 24, 3, torch.float32, 5, 16, 0),  # uneven last split, D not a power of two
    (5, 1, 16, 8, torch.float16, 3, 16, 0),  # odd group
    (6, 2, 16, 5, torch.float32, 8, 16, 0),  # more splits than a short sequence needs
    (4, 2, 16, 4, torch.float32, 6, 16, 40),  # floor: 48-key splits, fewer active
    (4, 2, 16, 4, torch.float32, None, 64, 0),  # the shape-derived default
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_one_split_writes_its_rows(monkeypatch: pytest.MonkeyPatch, dtype) -> None:
    """One split (the default split count at large batches), the merge off: the split kernel
    stores the rows itself, bit for bit what the merge kernel returns, in one launch; padding
    sequences get no row."""
    from kernels.triton_impl import attention_decode as ad

    seq_lens = [1, 37, 12, 45, 5, 100]
    batch = _with_empty(make_batch(seq_lens, [1] * 6, 4, 2, 16, 4, dtype), [2])
    args, scale = batch.args(), batch.q.shape[-1] ** -0.5
    monkeypatch.setattr(ad, "ONE_SPLIT_DIRECT", False)
    merged = ad.paged_attention_decode(*args, scale=scale, num_splits=1, block_n=16)
    monkeypatch.setattr(ad, "ONE_SPLIT_DIRECT", True)
    _no_merge_kernel(monkeypatch)
    direct = ad.paged_attention_decode(*args, scale=scale, num_splits=1, block_n=16)
    ref, n = _ref_rows(batch)
    assert torch.equal(direct[:n], merged[:n])
    torch.testing.assert_close(direct[:n], ref, atol=TOL[dtype], rtol=TOL[dtype])
    with pytest.raises(AssertionError, match="merge"):  # more splits still merge
        ad.paged_attention_decode(*args, scale=scale, num_splits=2, block_n=16)


@needs_triton
@pytest.mark.parametrize(
    ("hq", "hkv", "d", "block_size", "dtype", "num_splits", "block_n", "min_keys"), FUSED_CASES
)
def test_decode_fused_merge(
    monkeypatch: pytest.MonkeyPatch,
    hq: int,
    hkv: int,
    d: int,
    block_size: int,
    dtype: torch.dtype,
    num_splits: int | None,
    block_n: int,
    min_keys: int,
) -> None:
    """Fused == reference; == the two-kernel path; one launch; counters back at zero."""
    from kernels.triton_impl import attention_decode as ad

    monkeypatch.setattr(ad, "MIN_KEYS_PER_PROGRAM", min_keys)
    # contexts: one key, block-size multiples and not, past several splits of 16 keys
    seq_lens = [1, 37, 12, 45, 5, 100, 64]
    batch = make_batch(seq_lens, [1] * len(seq_lens), hq, hkv, d, block_size, dtype)
    kw = {"num_splits": num_splits, "block_n": block_n}
    unfused = _decode(batch, monkeypatch, False, **kw)
    _no_merge_kernel(monkeypatch)
    fused = _decode(batch, monkeypatch, True, **kw)
    ref = paged_attention_ref(*batch.args(), scale=d**-0.5)
    torch.testing.assert_close(fused, ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(unfused, ref, atol=TOL[dtype], rtol=TOL[dtype])
    if num_splits == 1:  # the merge of one split returns it as is: the direct write must match
        assert torch.equal(fused, unfused)
    else:
        torch.testing.assert_close(
            fused, unfused, atol=1e-6 if dtype == torch.float32 else 1e-3, rtol=0
        )
    assert int(_counters_cpu().abs().sum()) == 0


@needs_triton
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(("num_splits", "block_n"), [(1, 16), (3, 16), (8, 16), (2, 64)])
def test_decode_early_kv_is_bit_identical(
    monkeypatch: pytest.MonkeyPatch, fused: bool, num_splits: int, block_n: int
) -> None:
    """EARLY_KV (the first key tile read before the PDL wait, the step's own key patched in
    after it): the same bits as reading everything after the wait. Cache rows outside every
    sequence are NaN, so a lane read outside its tile would show."""
    from kernels.triton_impl import attention_decode as ad

    seq_lens = [1, 37, 12, 45, 5, 100, 64, 16]  # the new key first, mid-tile, tile-last
    batch = make_batch(seq_lens, [1] * len(seq_lens), 8, 2, 24, 4, torch.float16)
    used = torch.zeros(batch.k_cache.shape[:2], dtype=torch.bool)
    for row, n in zip(batch.block_tables.long(), seq_lens, strict=True):
        pos = torch.arange(n)
        used[row[pos // 4], pos % 4] = True
    batch.k_cache[~used] = float("nan")
    batch.v_cache[~used] = float("nan")
    kw = {"num_splits": num_splits, "block_n": block_n}
    launched: list[bool] = []
    kernel = ad._decode_split_kernel

    class Spy:  # records which variant each launch compiled
        def __getitem__(self, grid: object):
            def launch(*args: object, **kwargs: object) -> object:
                launched.append(bool(kwargs["EARLY_KV"]))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(ad, "_decode_split_kernel", Spy())
    monkeypatch.setattr(ad, "EARLY_KV", False)
    late = _decode(batch, monkeypatch, fused, **kw)
    monkeypatch.setattr(ad, "EARLY_KV", True)
    _decode(batch, monkeypatch, fused, **kw)  # 16 (sequence, kv head) pairs, 8 "SMs": late
    monkeypatch.setattr(ad, "EARLY_KV_ALWAYS", True)
    early = _decode(batch, monkeypatch, fused, **kw)
    assert launched == [False, False, True]
    assert not early.isnan().any()
    assert torch.equal(early, late)
    ref = paged_attention_ref(*batch.args(), scale=24**-0.5)
    torch.testing.assert_close(early, ref, atol=TOL[torch.float16], rtol=TOL[torch.float16])


@needs_triton
@pytest.mark.parametrize(("num_splits", "fused"), [(1, True), (4, True), (4, False)])
def test_decode_empty_sequences(
    monkeypatch: pytest.MonkeyPatch, num_splits: int, fused: bool
) -> None:
    """q_len 0 rows (first, middle, last) among real ones: rows of the others are right, the
    empty ones' counters stay zero (a stuck counter would break the next call)."""
    batch = _with_empty(make_batch([7, 50, 1, 33, 20, 9], [1] * 6, 4, 2, 16, 4), [0, 2, 5])
    ref, n = _ref_rows(batch)
    if fused:
        _no_merge_kernel(monkeypatch)
    for _ in range(2):
        out = _decode(batch, monkeypatch, fused, num_splits=num_splits, block_n=16)
        torch.testing.assert_close(out[:n], ref, atol=2e-5, rtol=2e-5)
        assert int(_counters_cpu().abs().sum()) == 0


@needs_triton
def test_decode_counters_reset_across_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Repeated calls of different shapes reuse the same counters: each must find them at
    zero and leave them at zero, and give the same result as the first time."""
    _no_merge_kernel(monkeypatch)
    shapes = [([30, 70, 2], 4, 2), ([90], 6, 3), ([18, 40, 40, 5], 4, 1)]
    batches = [make_batch(lens, [1] * len(lens), hq, hkv, 16, 4) for lens, hq, hkv in shapes]
    first = []
    for round_ in range(2):
        for i, batch in enumerate(batches):
            out = _decode(batch, monkeypatch, True, num_splits=5, block_n=16)
            assert int(_counters_cpu().abs().sum()) == 0, (round_, i)
            if round_ == 0:
                torch.testing.assert_close(out, _ref_rows(batch)[0], atol=2e-5, rtol=2e-5)
                first.append(out)
            else:
                assert torch.equal(out, first[i])


@needs_triton
def test_decode_falls_back_past_counter_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """B * Hkv beyond the counter buffer takes the two-kernel path (and stays right)."""
    from kernels.triton_impl import attention_decode as ad

    launched = []
    real = ad._decode_merge_kernel

    class Spy:
        def __getitem__(self, grid: tuple[int, ...]) -> object:
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(ad, "_decode_merge_kernel", Spy())
    batch = make_batch([40, 9, 66], [1] * 3, 4, 2, 16, 4)
    monkeypatch.setattr(ad, "COUNTER_SLOTS", 5)  # B * Hkv = 6
    out = _decode(batch, monkeypatch, True, num_splits=3, block_n=16)
    assert launched == [(3, 4)]
    torch.testing.assert_close(out, _ref_rows(batch)[0], atol=2e-5, rtol=2e-5)
    monkeypatch.setattr(ad, "COUNTER_SLOTS", 6)
    _decode(batch, monkeypatch, True, num_splits=3, block_n=16)
    assert launched == [(3, 4)], "fits the counters: one launch"


def test_default_num_splits_min_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels.triton_impl import attention_decode as ad

    cpu = torch.device("cpu")  # 8 "SMs": by occupancy 16 splits for one (sequence, kv head)
    assert ad.default_num_splits(1, 1, 512, cpu) == 2  # 256 keys a split
    monkeypatch.setattr(ad, "MIN_KEYS_PER_SPLIT", 64)
    assert ad.default_num_splits(1, 1, 512, cpu) == 8
    assert ad.default_num_splits(1, 1, 1 << 20, cpu) == 16
    assert ad.default_num_splits(64, 4, 1 << 20, cpu) == 1
