"""Rotary: reference vs transformers' ERNIE-4.5 (1-D) and ERNIE-4.5-VL (3-D) rotary, Triton vs
reference."""

from __future__ import annotations

import pytest
import torch
from transformers import Ernie4_5Config
from transformers.models.ernie4_5 import modeling_ernie4_5 as hf_text
from transformers.models.ernie4_5_vl_moe import modeling_ernie4_5_vl_moe as hf_vl
from transformers.models.ernie4_5_vl_moe.configuration_ernie4_5_vl_moe import (
    Ernie4_5_VLMoeTextConfig,
)

from kernels import build_cos_sin_cache, rope_cos_sin, rotary_embedding, rotary_embedding_ref
from kernels._dispatch import interpreting, triton_available

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)
THETA = 500000.0
MAX_POS = 300


def _hf_text(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
    d = q.shape[-1]
    config = Ernie4_5Config(
        hidden_size=4 * d,
        num_attention_heads=4,
        head_dim=d,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
    )
    cos, sin = hf_text.Ernie4_5RotaryEmbedding(config)(q, positions[None])  # [1, T, D]
    # HF works on [batch, heads, T, D].
    q_out, k_out = hf_text.apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin
    )
    return q_out[0].transpose(0, 1), k_out[0].transpose(0, 1), cos[0]


def _hf_vl(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, section: list[int]):
    d = q.shape[-1]
    config = Ernie4_5_VLMoeTextConfig(
        hidden_size=4 * d,
        num_attention_heads=4,
        head_dim=d,
        rope_parameters={"rope_type": "default", "rope_theta": THETA, "mrope_section": section},
    )
    cos, sin = hf_vl.Ernie4_5_VLMoeTextRotaryEmbedding(config)(q, positions[:, None])
    q_out, k_out = hf_vl.apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin
    )
    return q_out[0].transpose(0, 1), k_out[0].transpose(0, 1), cos[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_reference_matches_transformers(dtype: torch.dtype) -> None:
    t, d = 9, 32
    q, k = torch.randn(t, 4, d).to(dtype), torch.randn(t, 2, d).to(dtype)
    positions = torch.randint(0, MAX_POS, (t,))
    hf_q, hf_k, hf_cos = _hf_text(q, k, positions)
    cache = build_cos_sin_cache(MAX_POS, d, THETA)
    out_q, out_k = rotary_embedding_ref(q.clone(), k.clone(), positions, cache)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out_q, hf_q, atol=tol, rtol=tol)
    torch.testing.assert_close(out_k, hf_k, atol=tol, rtol=tol)
    cos, _ = rope_cos_sin(positions, d, THETA)
    # HF's text cos is [cos, cos] (NeoX layout); apply_rotary_pos_emb interleaves its first half.
    torch.testing.assert_close(cos, hf_cos[:, : d // 2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("d", "section"), [(32, [4, 4, 8]), (128, [22, 22, 20])])
def test_vl_reference_matches_transformers(d: int, section: list[int]) -> None:
    t = 10
    q, k = torch.randn(t, 4, d), torch.randn(t, 2, d)
    positions = torch.randint(0, MAX_POS, (3, t))  # (t, h, w) all different
    hf_q, hf_k, hf_cos = _hf_vl(q, k, positions, section)
    cache = build_cos_sin_cache(MAX_POS, d, THETA)
    out_q, out_k = rotary_embedding_ref(q.clone(), k.clone(), positions, cache, section)
    torch.testing.assert_close(out_q, hf_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_k, hf_k, atol=1e-5, rtol=1e-5)
    cos, _ = rope_cos_sin(positions, d, THETA, section)
    torch.testing.assert_close(cos.repeat_interleave(2, -1), hf_cos, atol=1e-6, rtol=1e-6)


def test_vl_text_tokens_equal_1d_rotary() -> None:
    """A text token has t == h == w: 3-D rotary must reduce to 1-D rotary."""
    t, d = 6, 32
    q, k = torch.randn(t, 4, d), torch.randn(t, 2, d)
    pos = torch.randint(0, MAX_POS, (t,))
    cache = build_cos_sin_cache(MAX_POS, d, THETA)
    q1, k1 = rotary_embedding_ref(q.clone(), k.clone(), pos, cache)
    q3, k3 = rotary_embedding_ref(q.clone(), k.clone(), pos.expand(3, -1), cache, [4, 4, 8])
    assert torch.equal(q1, q3) and torch.equal(k1, k3)


@needs_triton
@pytest.mark.parametrize(
    ("hq", "hkv", "d", "section", "dtype"),
    [
        (4, 2, 32, None, torch.float32),
        (5, 1, 24, None, torch.float16),  # odd heads, D/2 = 12 not a power of two
        (4, 4, 32, [4, 4, 8], torch.float32),
        (6, 2, 24, [2, 2, 8], torch.float16),
    ],
)
def test_triton_matches_reference(
    hq: int, hkv: int, d: int, section: list[int] | None, dtype: torch.dtype
) -> None:
    t = 7
    q, k = torch.randn(t, hq, d).to(dtype), torch.randn(t, hkv, d).to(dtype)
    shape = (t,) if section is None else (3, t)
    positions = torch.randint(0, MAX_POS, shape)
    cache = build_cos_sin_cache(MAX_POS, d, THETA)
    ref_q, ref_k = rotary_embedding_ref(q.clone(), k.clone(), positions, cache, section)
    out_q, out_k = rotary_embedding(q, k, positions, cache, section, impl="triton")
    assert out_q is q and out_k is k  # in place
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out_q, ref_q, atol=tol, rtol=tol)
    torch.testing.assert_close(out_k, ref_k, atol=tol, rtol=tol)


@needs_triton
def test_triton_rotates_views_of_fused_qkv_in_place() -> None:
    t, hq, hkv, d = 5, 4, 2, 16
    qkv = torch.randn(t, (hq + 2 * hkv) * d)
    ref = qkv.clone()
    positions = torch.randint(0, MAX_POS, (3, t))
    cache = build_cos_sin_cache(MAX_POS, d, THETA)

    def split(x: torch.Tensor):
        return x[:, : hq * d].view(t, hq, d), x[:, hq * d : (hq + hkv) * d].view(t, hkv, d)

    rotary_embedding_ref(*split(ref), positions, cache, [2, 2, 4])
    rotary_embedding(*split(qkv), positions, cache, [2, 2, 4], impl="triton")
    torch.testing.assert_close(qkv, ref, atol=1e-5, rtol=1e-5)  # v untouched in both


@needs_triton
@pytest.mark.parametrize(("hkv", "d", "dtype"), [(2, 16, torch.float32), (1, 24, torch.float16)])
def test_triton_rotary_writes_kv_cache_like_write_kv(hkv: int, d: int, dtype: torch.dtype) -> None:
    """Rotary fused with the cache write (views of one fused qkv row, a padding slot -1)
    leaves q, k and both caches exactly as rotary then `write_kv` do."""
    from kernels import write_kv

    t, hq, blocks, bs = 6, 4, 5, 4
    qkv = torch.randn(t, (hq + 2 * hkv) * d).to(dtype)
    positions = torch.randint(0, MAX_POS, (3, t))
    cache = build_cos_sin_cache(MAX_POS, d, THETA)
    slots = torch.tensor([3, 17, -1, 0, 9, 18], dtype=torch.int64)

    def parts(x: torch.Tensor):
        q = x[:, : hq * d].view(t, hq, d)
        k = x[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
        return q, k, x[:, (hq + hkv) * d :].view(t, hkv, d)

    ref = qkv.clone()
    want_k, want_v = (
        torch.zeros(blocks, bs, hkv, d, dtype=dtype),
        torch.zeros(blocks, bs, hkv, d, dtype=dtype),
    )
    q, k, v = parts(ref)
    rotary_embedding(q, k, positions, cache, [2, 2, d // 2 - 4], impl="torch")
    write_kv(k, v, want_k, want_v, slots, impl="torch")
    got_k, got_v = torch.zeros_like(want_k), torch.zeros_like(want_v)
    q, k, v = parts(qkv)
    rotary_embedding(
        q, k, positions, cache, [2, 2, d // 2 - 4], impl="triton", kv_write=(v, got_k, got_v, slots)
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(qkv, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(got_k, want_k, atol=tol, rtol=tol)
    assert torch.equal(got_v, want_v)
    assert got_k.view(-1, hkv, d)[slots[slots >= 0]].abs().sum() > 0


@pytest.mark.parametrize("three_d", [False, True])
def test_rope_table_matches_the_torch_table(three_d: bool) -> None:
    """`rope_table` (one launch) against torch's cast, gather, product, cos, sin and concat:
    the same angles, cos and sin to the last bit in fp32 on a GPU (libdevice); numpy's in
    the interpreter differ by an ulp."""
    from kernels._dispatch import interpreting, triton_available
    from kernels.rotary import mrope_pair_axes, rope_inv_freq, rope_table, rope_table_ref

    if not (triton_available() and interpreting()):
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    inv_freq = rope_inv_freq(20, 10000.0)  # 10 pairs: a padded block of 16
    axis = mrope_pair_axes(20, [4, 4, 2]) if three_d else None
    pos = torch.randint(0, 100_000, (3, 37) if three_d else (37,))  # 37: a ragged last block
    got = rope_table(pos, inv_freq, axis, impl="triton")
    want = rope_table_ref(pos, inv_freq, axis)
    assert got.shape == (37, 20) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-7, rtol=0)
