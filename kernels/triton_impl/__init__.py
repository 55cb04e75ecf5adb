"""Triton kernels. Importing anything here imports triton: only the dispatch functions in
``kernels/*.py`` do so, lazily, after checking that the Triton path was chosen."""
