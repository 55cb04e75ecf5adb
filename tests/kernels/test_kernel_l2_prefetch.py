"""L2 prefetch (kernels/l2_prefetch.py): reads only, in the interpreter and as a CPU no-op."""

from __future__ import annotations

import pytest
import torch

from kernels._dispatch import interpreting, triton_available
from kernels.l2_prefetch import l2_prefetch

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)


@needs_triton
@pytest.mark.parametrize("shape", [(3, 5), (8192,), (8193, 2), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int32])
def test_prefetch_reads_without_writing(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    t = (torch.randn(shape) * 100).to(dtype)
    if t.numel() * t.element_size() % 4:  # odd half-precision count: not whole words
        t = torch.cat([t.reshape(-1), t.reshape(-1)[:1]])
    before = t.clone()
    l2_prefetch(t, impl="triton")
    assert torch.equal(t, before)


def test_prefetch_cpu_is_a_no_op_and_refuses_strided() -> None:
    t = torch.arange(10, dtype=torch.float32)
    l2_prefetch(t)  # auto on CPU: nothing to warm
    assert torch.equal(t, torch.arange(10, dtype=torch.float32))
    with pytest.raises(AssertionError, match="contiguous"):
        l2_prefetch(torch.randn(4, 4).t())
