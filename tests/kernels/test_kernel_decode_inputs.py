"""A captured decode step's input launch (kernels/triton_impl/decode_inputs.py) vs torch."""

from __future__ import annotations

import pytest
import torch

from kernels._dispatch import interpreting, triton_available
from kernels.decode_inputs import decode_inputs

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_decode_inputs_takes_fed_ids_where_src_names_them(impl: str) -> None:
    b = 300  # more rows than one program's block
    host = torch.randint(0, 1000, (b,))
    fed = torch.randint(1000, 2000, (b,))
    src = torch.full((b,), -1)
    src[::3] = torch.randperm(b)[: len(src[::3])]  # every third row from an arbitrary place
    lens = torch.randint(1, 5000, (b,))
    ids, lens32 = torch.empty(b, dtype=torch.long), torch.empty(b, dtype=torch.int32)
    decode_inputs(host, src, fed, lens, ids, lens32, impl=impl)
    want = host.clone()
    want[::3] = fed[src[::3]]
    assert torch.equal(ids, want)
    assert torch.equal(lens32, lens.to(torch.int32))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize(("n", "width"), [(3, 300), (5, 2), (0, 4)])
def test_decode_inputs_spreads_the_staged_block_table(impl: str, n: int, width: int) -> None:
    """Rows [:n] of the [B, W] table get the staged [n, width] rows (a width past one
    program's block, a narrow one, none); the rest of the table is left as it was."""
    b, w = 6, 320
    z = torch.zeros(b, dtype=torch.long)
    staged = torch.randint(0, 10_000, (b * w,), dtype=torch.int32)
    table = torch.full((b, w), -7, dtype=torch.int32)
    header = torch.tensor([n, width])
    ids, lens32 = torch.empty(b, dtype=torch.long), torch.empty(b, dtype=torch.int32)
    decode_inputs(z, z - 1, z, z + 1, ids, lens32, tables=(header, staged, table), impl=impl)
    want = torch.full((b, w), -7, dtype=torch.int32)
    want[:n, :width] = staged[: n * width].view(n, width)
    assert torch.equal(table, want)
