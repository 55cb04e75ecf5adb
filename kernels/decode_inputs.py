"""A captured decode step's first launch: its token ids and int32 sequence lengths.

The step's inputs arrive as one host-to-device copy of int64 rows (ids, positions, slots,
sequence lengths, and `src`). A row whose token was sampled on the device by the step before
and is not on the host yet names its place in `fed` (the buffer that step's sampler wrote)
in `src`; other rows have `src = -1` and take the host id. Gathering those ids inside the
graph spares a device-to-device copy between steps, which cost ~10 us of the GPU's gap
between two decode steps on an H200 (the copy, and the wait for the copy before it).
"""

from __future__ import annotations

import torch

from kernels._dispatch import Impl, use_triton


def decode_inputs(
    host_ids: torch.Tensor,
    src: torch.Tensor,
    fed: torch.Tensor,
    lens: torch.Tensor,
    ids_out: torch.Tensor,
    lens_out: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    impl: Impl = None,
) -> None:
    """ids_out[i] = fed[src[i]] if src[i] >= 0 else host_ids[i]; lens_out = lens as int32.

    host_ids, src, lens `[B]` int64 (rows of the packed inputs); fed `[F]` int64; ids_out
    `[B]` int64; lens_out `[B]` int32. `tables` = (header `[2]` int64 = (n, width), staged
    int32 holding an `[n, width]` block table at its front, out `[B, W]` int32): rows
    `[:n]` of out get the staged rows in their first width columns (the rest is left), so
    the table rides in the same host copy as the rows. In place, no host sync on CUDA
    (graph-capturable)."""
    b = host_ids.shape[0]
    assert src.shape == lens.shape == ids_out.shape == lens_out.shape == (b,), (src.shape, b)
    assert lens_out.dtype == torch.int32 and ids_out.dtype == fed.dtype == torch.int64
    if use_triton(host_ids, impl):
        from kernels.triton_impl.decode_inputs import decode_inputs_triton

        decode_inputs_triton(host_ids, src, fed, lens, ids_out, lens_out, tables)
        return
    ids_out.copy_(torch.where(src >= 0, fed[src.clamp(min=0)], host_ids))
    lens_out.copy_(lens)
    if tables is not None:
        header, staged, out = tables
        n, width = header.tolist()  # a host read: the reference runs on the CPU
        out[:n, :width] = staged[: n * width].view(n, width)
