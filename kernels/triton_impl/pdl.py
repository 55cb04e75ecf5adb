"""Programmatic dependent launch (PDL, Hopper and newer) for the decode-path kernels.

A decode step is a chain of ~10 small dependent kernels per layer. Launched plainly, each one
is scheduled only after the one before has fully drained. Launched with ``launch_pdl=True``
a kernel may be scheduled while its predecessor still runs. Every such kernel here begins
with ``pdl_enter``: it lets the *next* kernel be scheduled as soon as every program of this
one has started (``griddepcontrol.launch_dependents``), then blocks until the previous kernel
has completed and its writes are visible (``griddepcontrol.wait``). Nothing is read or
written before that wait, so each kernel sees every write of every kernel before it (each
one waited for its own predecessor), whatever else the stream holds; kernels launched
without the attribute (torch's, cuBLAS) keep plain stream order.

Measured on an H100, 28B decode step at batch 1 (bench/decode_step_bench.py, RESULTS.md):
3.344 -> 3.233 ms a replayed step, logits bit-identical. Asking the L2 for a kernel's weight
rows before the wait (bulk prefetch) was tried and lost 0.08 ms: the early prefetches
competed with the attention and MoE kernels still running.

A kernel may split the two (``pdl_launch`` ... ``pdl_wait``) to read *weights* in between:
they are never written while a step runs, so their HBM latency overlaps the previous kernel's
tail (``PDL_PRELOAD``: the decode GEMVs and the router read their first weight chunks there).

A kernel resident under PDL holds its SM slots while it waits. Work forked onto another stream
at that point (the shared experts beside the router) then finds no slot: the routed up launch,
~10 programs a SM, is therefore launched plainly when the side stream runs beside it
(``kernels.triton_impl.gemv.UP_PDL_BESIDE``).

Both instructions are no-ops when the launch did not ask for PDL; the interpreter never takes
these branches (``PDL`` is false on CPU).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def pdl_launch(PDL: tl.constexpr):
    # the first half of pdl_enter: let the next kernel be scheduled
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    # the second half: block until the previous kernel is complete and its writes visible
    if PDL:
        gdc_wait()
