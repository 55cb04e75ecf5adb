"""Triton kernels. Importing anything here imports triton: only the dispatch functions in
``kernels/*.py`` do so, lazily, after checking that the Triton path was chosen. Under the
CPU interpreter (``TRITON_INTERPRET=1``: tests, ``bench/gpu_bench.py --tiny``) the
interpreter is first fixed (numpy >= 2.4, bf16 dots: ``_interpreter``)."""

from kernels._dispatch import interpreting

if interpreting():
    from kernels.triton_impl._interpreter import patch_interpreter

    patch_interpreter()
