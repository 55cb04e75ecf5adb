"""Kernel tests run the Triton kernels in the CPU interpreter (``TRITON_INTERPRET=1``).

The variable must be set before triton decorates any kernel, hence at conftest import.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from kernels._dispatch import triton_available

if triton_available():  # also applied on importing kernels.triton_impl; idempotent
    from kernels.triton_impl._interpreter import patch_interpreter

    patch_interpreter()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
