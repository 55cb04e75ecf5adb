"""A fix for triton 3.6's CPU interpreter under numpy >= 2.4, applied wherever it runs.

The interpreter turns a scalar into a Python int with ``int(array)``, which numpy >= 2.4
refuses for the shape-(1,) arrays it uses for scalars; loops with run-time bounds
(``for s in range(lo, hi, BLOCK)``) then fail. Known upstream (triton-lang/triton #9171);
this patches the same line the upstream fix touches. GPUs never interpret, so it changes
nothing there.
"""

from __future__ import annotations


def patch_for_numpy_2_4() -> None:
    """Idempotent; a no-op where the interpreter has no such hook."""
    import triton.runtime.interpreter as interp

    original = getattr(interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_tandem_patched", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._tandem_patched = True  # type: ignore[attr-defined]
    interp._patch_lang_tensor = patched
