"""Fixes for triton 3.6's CPU interpreter, applied wherever it runs. GPUs never interpret,
so nothing here changes a GPU launch.

* numpy >= 2.4: the interpreter turns a scalar into a Python int with ``int(array)``, which
  numpy >= 2.4 refuses for the shape-(1,) arrays it uses for scalars; loops with run-time
  bounds (``for s in range(lo, hi, BLOCK)``) then fail. Known upstream (triton-lang/triton
  #9171); this patches the same line the upstream fix touches.
* bf16 dots: the interpreter stores bf16 as raw uint16 and its ``tl.dot`` multiplies those
  integers (an operand of 1.0 counts as 16256), so any bf16 ``tl.dot`` returns garbage. The
  patch widens bf16 operands to fp32 first, exactly (a bf16 product is exact in fp32 too),
  as the fp8 operands are widened to fp16 there already.
"""

from __future__ import annotations


def patch_interpreter() -> None:
    """Both fixes; idempotent, and a no-op where the interpreter has no such hooks."""
    _patch_index_for_numpy_2_4()
    _patch_bf16_dot()


def _patch_index_for_numpy_2_4() -> None:
    import triton.runtime.interpreter as interp

    original = getattr(interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_tandem_patched", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._tandem_patched = True  # type: ignore[attr-defined]
    interp._patch_lang_tensor = patched


def _patch_bf16_dot() -> None:
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    builder = getattr(interp, "InterpreterBuilder", None)
    convert = getattr(interp, "_convert_float", None)
    original = getattr(builder, "create_dot", None)
    if original is None or convert is None or getattr(original, "_tandem_patched", False):
        return

    def widen(handle):  # type: ignore[no-untyped-def]
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = convert(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interp.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._tandem_patched = True  # type: ignore[attr-defined]
    builder.create_dot = create_dot
