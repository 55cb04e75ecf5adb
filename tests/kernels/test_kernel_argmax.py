"""Row argmax (kernels/triton_impl/argmax.py) vs torch.argmax, in the interpreter."""

from __future__ import annotations

import pytest
import torch

import kernels.triton_impl.argmax as argmax_impl
from kernels._dispatch import interpreting, triton_available
from kernels.argmax import argmax

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("b", "v"), [(1, 300), (3, 257), (5, 64), (2, 1)])
def test_argmax_matches_torch(monkeypatch: pytest.MonkeyPatch, dtype, b: int, v: int) -> None:
    monkeypatch.setattr(argmax_impl, "BLOCK", 64)  # several splits a row, a ragged last one
    logits = torch.randn(b, v).to(dtype)
    got = argmax(logits, impl="triton")
    assert got.dtype == torch.int64 and got.shape == (b,)
    assert torch.equal(got, logits.argmax(dim=-1))


@needs_triton
def test_argmax_ties_go_to_the_lowest_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ties inside a split and across splits (the later split must lose), -inf rows, and a
    maximum in the ragged last split; the counters are reset for the next launch."""
    monkeypatch.setattr(argmax_impl, "BLOCK", 16)
    logits = torch.randn(4, 70)
    logits[0, [5, 9, 40]] = 10.0  # same split twice, then a later split
    logits[1, [33, 17]] = 7.0  # across splits, the earlier split's column wins
    logits[2] = float("-inf")  # torch: column 0
    logits[3, 69] = 9.0  # the ragged last split
    for _ in range(2):  # a second launch sees zeroed counters
        got = argmax(logits, impl="triton")
        assert got.tolist() == [5, 17, 0, 69]
        assert torch.equal(got, logits.argmax(dim=-1))


@needs_triton
def test_argmax_nan_counts_as_largest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(argmax_impl, "BLOCK", 16)
    logits = torch.randn(1, 40)
    logits[0, 30] = float("nan")
    assert argmax(logits, impl="triton").tolist() == logits.argmax(dim=-1).tolist() == [30]


def test_argmax_rejects_other_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        argmax(torch.zeros(3))
    assert argmax(torch.zeros(0, 5)).shape == (0,)


@needs_triton
def test_argmax_float64_keeps_its_precision() -> None:
    """Two float64 logits that round to the same float32: the later, larger one wins."""
    logits = torch.zeros(1, 10, dtype=torch.float64)
    logits[0, 2] = 1.0
    logits[0, 7] = 1.0 + 1e-12
    assert argmax(logits, impl="triton").tolist() == [7]
