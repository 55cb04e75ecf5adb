"""The one-launch decode attention half (kernels/attention_block.py) vs the chain of torch
references, in the interpreter (which runs its three phases as three launches)."""

from __future__ import annotations

import pytest
import torch

from engine.layers.rotary import TextRotary
from kernels._dispatch import interpreting, triton_available
from kernels.attention_block import attention_block, attention_block_ref, use_attention_block

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def _case(hq: int, hkv: int, d: int, hidden: int, block_size: int, seq: int, dtype, bias: bool):
    g = torch.Generator().manual_seed(seq * 31 + hq)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    n_qkv = (hq + 2 * hkv) * d
    blocks = -(-seq // block_size)
    table_ids = torch.randperm(blocks + 3, generator=g)[:blocks] + 1  # scattered, never 0
    bt = torch.zeros(1, blocks + 2, dtype=torch.int32)  # wider than the sequence
    bt[0, :blocks] = table_ids.to(torch.int32)
    pos = seq - 1
    slot = int(bt[0, pos // block_size]) * block_size + pos % block_size
    return dict(
        h=rnd(1, hidden),
        residual=rnd(1, hidden),
        norm_weight=(1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype),
        qkv=(rnd(n_qkv, hidden, scale=hidden**-0.5), rnd(n_qkv) if bias else None),
        o=(rnd(hidden, hq * d, scale=(hq * d) ** -0.5), rnd(hidden) if bias else None),
        rope=TextRotary(d, 10000.0).step_table(torch.tensor([pos])),
        kv_cache=(rnd(blocks + 5, block_size, hkv, d), rnd(blocks + 5, block_size, hkv, d)),
        meta=(
            torch.tensor([slot]),
            bt,
            torch.tensor([seq], dtype=torch.int32),
            torch.tensor([0, 1], dtype=torch.int32),
        ),
        heads=(hq, hkv),
        scale=d**-0.5,
    )


def _run(case: dict, residual: bool, impl, kv_cache=None):
    kv = kv_cache or tuple(c.clone() for c in case["kv_cache"])
    fn = attention_block_ref if impl == "torch" else attention_block
    out, res = fn(
        case["h"], case["residual"] if residual else None, case["norm_weight"], 1e-5,
        case["qkv"], case["o"], *case["heads"], case["rope"], kv, case["meta"], case["scale"],
        impl=impl,
    )  # fmt: skip
    return out, res, kv


@needs_triton
@pytest.mark.parametrize(
    ("hq", "hkv", "d", "hidden", "block_size", "seq", "dtype"),
    [
        (4, 2, 16, 64, 4, 1, torch.float32),  # the first token: one key
        (4, 2, 16, 64, 4, 9, torch.float32),
        (5, 1, 16, 48, 16, 37, torch.float16),  # group of 5, splits of several tiles
        (8, 2, 32, 96, 8, 130, torch.float16),  # more keys than the splits x 64-key tiles
    ],
)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_attention_block_matches_the_chain(
    hq, hkv, d, hidden, block_size, seq, dtype, residual, bias
):
    from kernels.triton_impl.attention_block import sync_buffer

    case = _case(hq, hkv, d, hidden, block_size, seq, dtype, bias)
    assert use_attention_block(case["h"], case["qkv"][0], impl="triton")
    ref_out, ref_res, ref_kv = _run(case, residual, "torch")
    out, res, kv = _run(case, residual, "triton")
    assert out.shape == ref_out.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref_out, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(res, ref_res)  # the residual add is exact
    for got, want in zip(kv, ref_kv, strict=True):  # the new token's k (rotated) and v
        torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    # only the new token's cache row changed
    slot = int(case["meta"][0])
    for got, before in zip(kv, case["kv_cache"], strict=True):
        flat_got, flat_before = got.flatten(0, 1), before.flatten(0, 1)
        changed = (flat_got != flat_before).flatten(1).any(1).nonzero().flatten().tolist()
        assert changed in ([slot], [])
    assert not sync_buffer(case["h"].device).any(), "counters must be back at zero"


@needs_triton
def test_attention_block_padding_row_writes_no_cache() -> None:
    """A padding row (q_len 0, slot -1), as CUDA-graph warm-up runs: no cache write, counters
    stay zero, the residual is still the sum."""
    from kernels.triton_impl.attention_block import sync_buffer

    case = _case(4, 2, 16, 64, 4, 9, torch.float32, False)
    case["meta"] = (
        torch.tensor([-1]),
        case["meta"][1],
        case["meta"][2],
        torch.tensor([0, 0], dtype=torch.int32),
    )
    _, res, kv = _run(case, True, "triton")
    for got, before in zip(kv, case["kv_cache"], strict=True):
        assert torch.equal(got, before)
    ref = (case["h"].float() + case["residual"].float()).to(case["h"].dtype)
    assert torch.equal(res, ref)
    assert not sync_buffer(case["h"].device).any()


def test_attention_block_dispatch_cpu_runs_the_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU (auto) and with the switch off the chain runs; more than one row never fuses."""
    import kernels.attention_block as ab

    case = _case(4, 2, 16, 64, 4, 9, torch.float32, True)
    h, w = case["h"], case["qkv"][0]
    assert not use_attention_block(h, w)  # CPU tensors, auto: the torch chain
    assert not use_attention_block(torch.cat([h, h]), w, impl="torch")
    assert not use_attention_block(h.half(), w, impl="torch")
    ref_out, ref_res, _ = _run(case, True, "torch")
    out, res, _ = _run(case, True, None)
    assert torch.equal(out, ref_out) and torch.equal(res, ref_res)
    monkeypatch.setattr(ab, "FUSED", False)
    assert not use_attention_block(h, w)
