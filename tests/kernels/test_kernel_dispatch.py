"""Dispatch: kernels import and run their references without triton; explicit requests for the
Triton path fail loudly instead of falling back."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kernels import rms_norm
from kernels._dispatch import next_pow2, use_triton

REPO = Path(__file__).resolve().parents[2]


def test_import_and_cpu_path_without_triton() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        import kernels
        assert not kernels.triton_available()
        x = torch.randn(3, 8)
        out, res = kernels.rms_norm(x, torch.ones(8), 1e-6)
        assert res is x and out.shape == x.shape
        q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
        cache = kernels.build_cos_sin_cache(16, 8, 10000.0)
        kernels.rotary_embedding(q, k, torch.arange(3), cache)
        assert "triton" not in {m.split(".")[0] for m in sys.modules if sys.modules[m]}
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr


def test_auto_uses_reference_on_cpu() -> None:
    assert not use_triton(torch.randn(2), None)
    assert not use_triton(torch.randn(2), "torch")


def test_explicit_triton_on_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        rms_norm(torch.randn(2, 4), torch.ones(4), 1e-6, impl="triton")
    with pytest.raises(ValueError):
        use_triton(torch.randn(2), "cuda")  # type: ignore[arg-type]


def test_next_pow2() -> None:
    assert [next_pow2(n) for n in (0, 1, 2, 3, 5, 16, 17)] == [1, 1, 2, 4, 8, 16, 32]
