"""`kernels.decode_inputs` in one launch: one program a row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_inputs_kernel(
    host_ptr, src_ptr, fed_ptr, lens_ptr, ids_ptr, lens_out_ptr, header_ptr, staged_ptr,
    tables_ptr, stride_t, HAS_TABLES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    src = tl.load(src_ptr + r)
    fed = tl.load(fed_ptr + tl.maximum(src, 0))  # fed[0] exists: a harmless read when src < 0
    tl.store(ids_ptr + r, tl.where(src >= 0, fed, tl.load(host_ptr + r)))
    tl.store(lens_out_ptr + r, tl.load(lens_ptr + r).to(tl.int32))
    if HAS_TABLES:
        n = tl.load(header_ptr)
        width = tl.load(header_ptr + 1)
        if r < n:  # row r of the staged [n, width] table into row r of the [B, W] one
            row = staged_ptr + r.to(tl.int64) * width
            for c0 in range(0, width, BLOCK):
                offs = c0 + tl.arange(0, BLOCK)
                mask = offs < width
                v = tl.load(row + offs, mask=mask)
                tl.store(tables_ptr + r.to(tl.int64) * stride_t + offs, v, mask=mask)


def decode_inputs_triton(
    host_ids: torch.Tensor,
    src: torch.Tensor,
    fed: torch.Tensor,
    lens: torch.Tensor,
    ids_out: torch.Tensor,
    lens_out: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    b = host_ids.shape[0]
    for t in (host_ids, src, lens, ids_out, lens_out, fed):
        assert t.stride(-1) == 1, "rows must be contiguous"
    header, staged, out = tables if tables is not None else (src, src, src)  # placeholders
    if tables is not None:
        assert out.shape[0] == b and out.stride(1) == 1 and out.dtype == staged.dtype
    _decode_inputs_kernel[(b,)](
        host_ids, src, fed, lens, ids_out, lens_out, header, staged, out,
        out.stride(0) if tables is not None else 0, HAS_TABLES=tables is not None, BLOCK=256,
        num_warps=1,
    )  # fmt: skip
