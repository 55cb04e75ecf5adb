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
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
