"""Kernel tests run the Triton kernels in the CPU interpreter (``TRITON_INTERPRET=1``).

The variable must be set before triton decorates any kernel, hence at conftest import.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from kernels._dispatch import triton_available


def _patch_interpreter_for_numpy_2_4() -> None:
    """triton 3.6's interpreter turns a scalar into a Python int with ``int(array)``, which
    numpy >= 2.4 refuses for the shape-(1,) arrays it uses for scalars; loops with run-time
    bounds (``for s in range(lo, hi, BLOCK)``) then fail. Known upstream (triton-lang/triton
    #9171); patch the same line the upstream fix touches. Test-only: GPUs never interpret."""
    if not triton_available():
        return
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor
    if getattr(original, "_tandem_patched", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._tandem_patched = True  # type: ignore[attr-defined]
    interp._patch_lang_tensor = patched


_patch_interpreter_for_numpy_2_4()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
