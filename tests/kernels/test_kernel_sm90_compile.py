"""The decode kernels compile for the H100 / H200 (sm_90a) with triton's backend and ptxas,
on this CPU machine (tools/sm90_compile.py): what the interpreter cannot check."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kernels._dispatch import triton_available

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")


def _compile(*args: str) -> tuple[int, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "sm90_compile.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return res.returncode, (res.stdout + res.stderr).splitlines()


NO_PDL = {"_rope_table_kernel", "_prefill_kernel", "_combine_sorted_kernel"}
"""Kernels launched without PDL (the step's first launch, and the prefill path's)."""


def test_decode_kernels_compile_for_sm90_under_pdl() -> None:
    """Every case, the engine's own launches included (`model`: decode b1-b256 and a
    prefill through the model code)."""
    rc, lines = _compile()
    assert rc == 0, "\n".join(lines[-30:])
    launches = [line for line in lines if line.startswith(("ok ", "FAIL "))]
    assert len(launches) >= 50 and all(line.startswith("ok ") for line in launches)
    for line in launches:
        if line.split()[2] not in NO_PDL:
            assert "griddepcontrol=2" in line, line  # PDL: launch_dependents and wait
        assert re.search(r"spills=0\b", line), line
    model = {line.split()[2] for line in launches if line.split()[1] == "model"}
    assert {"_qkv_rope_kernel", "_moe_up_kernel", "_moe_gemm_kernel", "_prefill_kernel"} <= model
    batch = [line for line in launches if "_batch_gate_route_kernel" in line]
    assert len(batch) == 4  # T = 16, 64, 256, 512
    for line in batch:  # three bf16 dots a step on tensor cores
        assert int(re.search(r"mma\.sync=(\d+)", line).group(1)) >= 48, line
    names = {line.split()[2] for line in launches}
    assert {"_align_kernel", "_moe_gemm_kernel", "_combine_kernel"} <= names


def test_without_pdl_the_batch_chain_has_no_pdl_instructions() -> None:
    rc, lines = _compile("moe_batch", "--no-pdl")
    assert rc == 0, "\n".join(lines[-30:])
    launches = [line for line in lines if line.startswith("ok ")]
    assert launches and not any("griddepcontrol" in line for line in launches)


def test_refuses_the_interpreter() -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "sm90_compile.py"), "norm"],
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "TRITON_INTERPRET" in res.stderr
