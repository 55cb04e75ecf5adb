"""Warm the GPU's L2 with a weight the next kernels will read.

At batch-1 decode some kernels are latency-bound (decode attention reads ~1 MB of KV in a few
microseconds) while the memory system idles. Reading the *next* projection's weights into the
L2 on a side stream during that window moves their HBM traffic off the critical path (the
H100's L2 holds 50 MB; ``o_proj`` of the 28B model is 13 MB). Nothing is written; on CPU it
does nothing.
"""

from __future__ import annotations

import torch

from kernels._dispatch import Impl, use_triton


def l2_prefetch(t: torch.Tensor, impl: Impl = None) -> None:
    """Read t's bytes into the L2 (GPU); no effect on values, no-op on CPU."""
    assert t.is_contiguous(), "prefetch reads a contiguous tensor"
    if t.numel() == 0 or (t.numel() * t.element_size()) % 4 or not use_triton(t, impl):
        return
    from kernels.triton_impl.l2_prefetch import l2_prefetch_triton

    l2_prefetch_triton(t)
