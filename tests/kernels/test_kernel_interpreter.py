"""The interpreter fixes (`kernels.triton_impl._interpreter`): what the CPU kernel tests
rest on."""

from __future__ import annotations

import pytest
import torch

from kernels._dispatch import interpreting, triton_available

needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="needs triton and TRITON_INTERPRET=1"
)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_dots_multiply_values_not_bit_patterns(dtype: torch.dtype) -> None:
    """A bf16 `tl.dot` in the interpreter equals the fp32 product of the same values (triton
    3.6 multiplied bf16's raw uint16 storage); fp16 was right before and stays so. Also a
    run-time loop bound (the numpy >= 2.4 fix)."""
    import triton
    import triton.language as tl

    import kernels.triton_impl  # noqa: F401  (applies the fixes)

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, K):
        r = tl.arange(0, 16)
        acc = tl.zeros([16, 16], dtype=tl.float32)
        for k0 in range(0, K, 16):  # a run-time bound
            c = k0 + tl.arange(0, 16)
            a = tl.load(a_ptr + r[:, None] * K + c[None, :])
            b = tl.load(b_ptr + c[:, None] * 16 + r[None, :])
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + r[:, None] * 16 + r[None, :], acc)

    a, b = torch.randn(16, 48).to(dtype), torch.randn(48, 16).to(dtype)
    c = torch.empty(16, 16)
    dot_kernel[(1,)](a, b, c, 48)
    torch.testing.assert_close(c, a.float() @ b.float(), atol=1e-5, rtol=1e-5)


@needs_triton
def test_fixes_apply_once() -> None:
    import triton.runtime.interpreter as interp

    from kernels.triton_impl._interpreter import patch_interpreter

    before = (interp.InterpreterBuilder.create_dot, interp._patch_lang_tensor)
    patch_interpreter()
    assert (interp.InterpreterBuilder.create_dot, interp._patch_lang_tensor) == before
    assert getattr(before[0], "_tandem_patched", False)
