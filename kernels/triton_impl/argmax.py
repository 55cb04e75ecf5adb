"""Row argmax in one launch: each row split over programs, the last to arrive picks.

Grid (B, S): program (b, s) reduces columns [s * BLOCK, (s + 1) * BLOCK) of row b to its
largest value and that value's first column, publishes both, and bumps the row's counter;
the program that bumps it last (acq_rel atomics order the stores) takes the first split
holding the row's largest value, writes its column and resets the counter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
"""Columns a program reduces (one load of 8 KB of bf16 logits): 26 programs a row of the
28B vocabulary."""


@triton.jit
def _argmax_kernel(
    x_ptr, vals_ptr, cols_ptr, count_ptr, out_ptr, V, stride_x, S: tl.constexpr,
    S_PAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    offs = s * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + b * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN: larger than every number
    best = tl.max(x, axis=0)
    # first column holding it (a padded column is -inf and past every real one)
    col = tl.min(tl.where(x == best, offs, V + BLOCK), axis=0)
    tl.store(vals_ptr + b * S + s, best)
    tl.store(cols_ptr + b * S + s, col)
    tl.debug_barrier()  # every warp's stores before the arrival publishes them
    if tl.atomic_add(count_ptr + b, 1) == S - 1:
        tl.atomic_xchg(count_ptr + b, 0)
        offs_s = tl.arange(0, S_PAD)
        mask = offs_s < S
        vals = tl.load(vals_ptr + b * S + offs_s, mask=mask, other=float("-inf"), volatile=True)
        cols = tl.load(cols_ptr + b * S + offs_s, mask=mask, other=0, volatile=True)
        top = tl.max(vals, axis=0)
        first = tl.min(tl.where(mask & (vals == top), offs_s, S_PAD), axis=0)
        tl.store(out_ptr + b, tl.sum(tl.where(offs_s == first, cols, 0), axis=0).to(tl.int64))


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _counters(device: torch.device, rows: int) -> torch.Tensor:
    """Per-row arrival counters, zero between launches, one set a stream (launches on one
    stream never overlap; on two streams they could, so each stream has its own)."""
    key = (device, torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < rows:
        # grown outside any graph capture: the engine's first sampling of a bucket is eager
        buf = _COUNTERS[key] = torch.zeros(max(rows, 256), dtype=torch.int32, device=device)
    return buf


def argmax_triton(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`logits [B, V]` (float, unit column stride) -> `[B]` int64, ties to the lowest index."""
    b, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    s = triton.cdiv(v, BLOCK)
    dev = logits.device
    vals = torch.empty(b, s, dtype=torch.float32, device=dev)  # [B, S] scratch
    cols = torch.empty(b, s, dtype=torch.int32, device=dev)  # [B, S]
    if out is None:
        out = torch.empty(b, dtype=torch.int64, device=dev)  # [B]
    _argmax_kernel[(b, s)](
        logits, vals, cols, _counters(dev, b), out, v, logits.stride(0), S=s,
        S_PAD=triton.next_power_of_2(s), BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip
    return out
