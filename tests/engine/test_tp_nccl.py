"""The GPU side of tensor parallelism that one GPU can check: an NCCL group's collectives,
eagerly and replayed from a CUDA graph. Kept apart from test_tensor_parallel.py so it imports
nothing the GPU image lacks (msgspec, pyzmq)."""

from __future__ import annotations

import pytest
import torch

from engine.parallel import TPInfo
from engine.tp_executor import make_group


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nccl_group_runs_collectives_eagerly_and_inside_a_cuda_graph():
    """The GPU side of `make_group` on the one GPU a test machine has: a one-rank NCCL group
    whose all-reduce / all-gather / broadcast run eagerly and replay from a CUDA graph, as
    decode graphs of a tensor-parallel engine capture them (2+ GPUs were not available)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    group = make_group(0, 1, store, torch.device("cuda"))
    try:
        x = torch.arange(8, dtype=torch.float32, device="cuda")
        gathered = [torch.empty_like(x)]

        def collectives() -> None:
            group.allreduce([x]).wait()
            group.allgather([gathered], [x]).wait()
            TPInfo(0, 2, group).broadcast(x)  # size 2 only to take the collective path

        collectives()
        torch.cuda.synchronize()
        assert torch.equal(gathered[0], x)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            collectives()  # warm-up outside the capture, as engine/cuda_graphs.py does
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            collectives()
        x.add_(1)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(gathered[0], x) and float(x[0]) == 1.0
    finally:
        group.shutdown()
