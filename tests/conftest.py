"""Test-wide settings that must precede any import of triton (transformers may import it).

Without a GPU, kernel tests run Triton in the CPU interpreter; CPU code paths pick the torch
references whatever this says, so setting it for the whole run changes nothing else.
"""

from __future__ import annotations

import os

import torch  # importing torch does not import triton, so the variable is still in time

if not torch.cuda.is_available():  # on a GPU machine the kernels run for real
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# CI explores the same examples every run (a red build then always means a regression);
# locally hypothesis keeps searching new ones.
from collections.abc import Callable

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def small_moe_block() -> Callable[[int], torch.nn.Module]:
    """A factory: an eval-mode MoE block (D 32, top-2 of 5 text experts of I 24, 3 vision
    experts of I 16, shared I 48) with N(0, 0.2) weights drawn from `seed`."""

    from engine.layers.moe import MoEBlock

    def make(seed: int) -> MoEBlock:
        torch.manual_seed(seed)
        block = MoEBlock(32, 2, 1e-12, text=(5, 24), vision=(3, 16), shared_intermediate=48)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.2)
        return block.eval()

    return make
