"""Choose between a Triton kernel and its torch reference.

Every public kernel takes ``impl: Impl = None``:

* ``None`` (auto): Triton on CUDA tensors when triton is importable, torch otherwise. This is
  what the engine passes, so the same model code runs on a GPU host and on a CPU-only CI box.
* ``"torch"``: always the reference.
* ``"triton"``: always the kernel. On CPU tensors this needs ``TRITON_INTERPRET=1`` (the
  interpreter runs the kernel with numpy); tests use it to check kernels without a GPU.

Triton is never imported at module import time, so ``import kernels`` works without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

Impl = Literal["torch", "triton"] | None


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked once)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor, impl: Impl) -> bool:
    """Decide whether a call on ``x`` goes to the Triton kernel.

    Raises when ``impl="triton"`` is asked for but cannot run, rather than silently falling
    back: a test that believes it exercised the kernel must really have done so.
    """
    if impl == "torch":
        return False
    if impl is None:
        return x.is_cuda and triton_available()
    if impl != "triton":
        raise ValueError(f"impl must be None, 'torch' or 'triton', got {impl!r}")
    if not triton_available():
        raise RuntimeError("impl='triton' requested but triton is not installed")
    if not x.is_cuda and not interpreting():
        raise RuntimeError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return True


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1); Triton block shapes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


CPU_SMS = 8
"""What ``num_sms`` says off CUDA (the interpreter: any small number; tools/sm90_compile.py
sets an H100's 132 so the tiles and grids it compiles are the card's)."""


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``CPU_SMS`` off CUDA)."""
    if device.type != "cuda":
        return CPU_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 for fp32 inputs (the default would be TF32 on
    Hopper and lose ~3 decimal digits); irrelevant for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


PDL = os.environ.get("TANDEM_PDL", "1") != "0"
"""Programmatic dependent launch for the decode-path kernels (``kernels/triton_impl/pdl.py``).
On by default on Hopper and newer; ``TANDEM_PDL=0`` turns it off (benchmarks flip this global
between captures to compare)."""


PDL_PRELOAD = int(os.environ.get("TANDEM_PDL_PRELOAD", "2"))
"""Under PDL, the decode GEMVs and the router read their first ``PDL_PRELOAD`` weight chunks
(0-4; 0 = none) before waiting on the kernel before them (weights are never written during a
step). A bool works too (benchmarks flip this global between captures)."""

PRELOAD_MAX_CHUNKS = 4
"""Chunks a kernel holds in registers before the wait (the kernels unroll this many)."""


def preload_chunks(k: int, block_k: int, cap: int | None = None, depth: int | None = None) -> int:
    """Weight chunks of ``block_k`` (of ``k`` columns) a kernel reads before its PDL wait:
    ``depth`` (None: ``PDL_PRELOAD``), at most PRELOAD_MAX_CHUNKS, the row's chunks and
    ``cap``."""
    n = min(int(PDL_PRELOAD if depth is None else depth), PRELOAD_MAX_CHUNKS, -(-k // block_k))
    return n if cap is None else min(n, cap)


@functools.cache
def _pdl_capable(index: int) -> bool:
    if interpreting() or not triton_available():
        return False
    try:
        from triton.language.extra.cuda import gdc_wait  # noqa: F401  (triton >= 3.3)
    except ImportError:
        return False
    return torch.cuda.get_device_capability(index) >= (9, 0)


def use_pdl(x: torch.Tensor) -> bool:
    """True when a Triton launch on x's device should use programmatic dependent launch."""
    return PDL and x.is_cuda and _pdl_capable(x.device.index or 0)
